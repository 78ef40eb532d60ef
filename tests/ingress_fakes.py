"""Fakes of the stage handles, across the handle protocol, and request helpers for the ingress
tests: the fakes script what the stages return (events, errors, slow streams); requests are
ASGI requests with a scripted `receive` (whole, chunked, held, or a disconnect).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request

from deployments.events import GenerationEvent
from deployments.ingress import IngressDeployment
from deployments.metrics import IngressMetrics

MODEL = "fake-model"


async def resolve(value: Any) -> Any:
    """Serve resolves a DeploymentResponse argument before the callee runs (errors included)."""
    return await value if inspect.isawaitable(value) else value


class _Options:
    """`handle.options(...)`: a view of the same fake that logs each call with its transport."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []  # (method, by reference)

    def options(self, **kwargs: Any) -> Any:
        return _OptionsView(self, kwargs.get("_by_reference", True))


class _OptionsView:
    def __init__(self, fake: _Options, by_reference: bool) -> None:
        self.fake, self.by_reference = fake, by_reference

    def __getattr__(self, method: str) -> _Call:
        call = getattr(self.fake, method)

        def logged(*args: Any) -> Any:
            self.fake.calls.append((method, self.by_reference))
            return call.remote(*args)

        return _Call(logged)


class _Call:
    """`handle.method.remote(...)` -> an awaitable (unary) or async iterator (stream)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class FakePreprocess(_Options):
    """`prepare` returns a shared future, as a DeploymentResponse may be awaited by several."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.error = error
        self.prepare = _Call(self._prepare)
        self.health = _Call(self._ok)

    def _prepare(self, request: Any, request_id: str) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self.error is not None:
            future.set_exception(self.error)
        else:
            future.set_result(request_id)
        return future

    async def _ok(self) -> bool:
        return True


class FakeVision(_Options):
    def __init__(self) -> None:
        super().__init__()
        self.encode = _Call(self._encode)
        self.health = _Call(self._ok)

    async def _encode(self, prepared: Any) -> None:
        await resolve(prepared)

    async def _ok(self) -> bool:
        return True


class FakeLLM(_Options):
    """Streams `texts` as one event each; choice i gets suffix `-i`; optionally waits first
    (`delay_s`) and between events (`gap_s`)."""

    def __init__(self, texts: list[str], *, delay_s: float = 0.0, gap_s: float = 0.0) -> None:
        super().__init__()
        self.texts = texts
        self.delay_s = delay_s
        self.gap_s = gap_s  # between consecutive events
        self.generate = _Call(self._generate)
        self.health = _Call(self._ok)

    async def _generate(
        self, prepared: Any, embeds: Any, index: int, interval: float
    ) -> AsyncIterator[dict[str, Any]]:
        await resolve(prepared)
        await resolve(embeds)
        await asyncio.sleep(self.delay_s)
        for k, text in enumerate(self.texts):
            if k:
                await asyncio.sleep(self.gap_s)
            last = k == len(self.texts) - 1
            event = GenerationEvent(
                text=text + (f"-{index}" if last else ""),
                token_ids=[k],
                finish_reason="stop" if last else None,
                num_prompt_tokens=11,
                num_output_tokens=k + 1,
            )
            yield event.to_wire()

    async def _ok(self) -> bool:
        return True


class RecordingMetrics(IngressMetrics):
    """IngressMetrics that also keep what was recorded, for assertions."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[str] = []
        self.ttfts: list[float] = []
        self.tpots: list[float] = []

    def request_done(self, status: str, seconds: float) -> None:
        self.statuses.append(status)
        super().request_done(status, seconds)

    def first_token(self, seconds: float) -> None:
        self.ttfts.append(seconds)
        super().first_token(seconds)

    def choice_done(self, first_token_at: float | None, end_at: float, num_tokens: int) -> None:
        if first_token_at is not None and num_tokens > 1:
            self.tpots.append((end_at - first_token_at) / (num_tokens - 1))
        super().choice_done(first_token_at, end_at, num_tokens)


def make_ingress(
    llm: FakeLLM,
    pre: FakePreprocess | None = None,
    max_inflight: int = 8,
    **kwargs: Any,
) -> Any:
    return IngressDeployment(
        pre or FakePreprocess(),
        FakeVision(),
        llm,
        model_name=MODEL,
        max_model_len=128,
        max_inflight=max_inflight,
        metrics=RecordingMetrics(),
        **kwargs,
    )


Receive = Callable[[], Awaitable[dict[str, Any]]]


def asgi_request(
    receive: Receive,
    path: str = "/v1/chat/completions",
    root_path: str = "",
    headers: dict[str, str] | None = None,
) -> Request:
    method = "GET" if path != "/v1/chat/completions" else "POST"
    scope = {
        "type": "http",
        "method": method,
        "path": root_path + path,  # ASGI: `path` holds the mount point, `root_path` names it
        "root_path": root_path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "query_string": b"",
    }
    return Request(scope, receive)


def make_request(
    body: bytes | dict[str, Any],
    path: str = "/v1/chat/completions",
    root_path: str = "",
    headers: dict[str, str] | None = None,
) -> Request:
    """A request whose whole body arrives in one message."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return chunked_request([raw], path=path, root_path=root_path, headers=headers)[0]


def chunked_request(
    chunks: list[bytes],
    *,
    path: str = "/v1/chat/completions",
    root_path: str = "",
    headers: dict[str, str] | None = None,
    gate: asyncio.Event | None = None,
    disconnect: bool = False,
) -> tuple[Request, list[int]]:
    """A request whose body arrives in `chunks` (after `gate` is set, if given), or a client
    that disconnects instead of sending; also the list of chunk sizes the server pulled."""
    pulled: list[int] = []
    queue = list(chunks)

    async def receive() -> dict[str, Any]:
        if gate is not None:
            await gate.wait()
        if disconnect or not queue:
            return {"type": "http.disconnect"}
        chunk = queue.pop(0)
        pulled.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": bool(queue)}

    return asgi_request(receive, path, root_path, headers), pulled


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


async def response_bytes(response: Any) -> bytes:
    if hasattr(response, "body_iterator"):
        return "".join([chunk async for chunk in response.body_iterator]).encode()
    return response.body


def call(ingress: Any, request: Request) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        response = await ingress(request)
        return response.status_code, await response_bytes(response)

    return asyncio.run(go())
