"""HTTP ingress: OpenAI routes, composition of the stages per request, SSE, error mapping.
(Over 400 lines: the routes, the per-request composition and the SSE body share admission state.)

In: starlette requests. Out: OpenAI JSON / server-sent events. Large arrays never materialise
here: for a request with media, the Preprocess response is passed by reference to the vision
pool and the LLM replica. A text-only request is tokenized here and goes to the LLM by value.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deployments.auth import ApiKeyAuth
from deployments.events import ChoiceAccumulator, GenerationEvent, running_usage, unwrap_error
from deployments.metrics import IngressMetrics
from deployments.preprocess import PreprocessDeployment
from internvl_core.errors import (
    AuthenticationError,
    EngineOverloadedError,
    InternVLError,
    InvalidRequestError,
    ModelNotFoundError,
)
from internvl_core.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    Delta,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    completion_id,
)
from internvl_core.serve_args import ServeArgs
from internvl_core.validation import format_path, schema_error

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20
NON_STREAM_INTERVAL_S = 3600.0


def error_response(exc: BaseException) -> JSONResponse:
    """The single table from our exceptions to OpenAI error JSON and HTTP status codes."""
    exc = unwrap_error(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, InternVLError):
        status, kind, message, param = exc.status_code, exc.error_type, exc.message, exc.param
        if isinstance(exc, EngineOverloadedError):
            headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    elif isinstance(exc, ValidationError):
        first = exc.errors()[0]
        param = format_path(first["loc"]) or None
        status, kind = 422, "invalid_request_error"
        message = f"{param}: {first['msg']}" if param else first["msg"]
    elif type(exc).__name__ in ("BackPressureError", "DeploymentUnavailableError"):
        status, kind, param = 503, "overloaded", None
        message = "the server is at capacity; retry shortly"
        headers["Retry-After"] = "1"
    else:
        logger.exception("internal error", exc_info=exc)
        status, kind, param = 500, "internal_error", None
        message = f"internal error: {type(exc).__name__}"
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=kind))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class IngressDeployment:
    """Routes `/v1/chat/completions`, `/v1/models`, `/health`; composes the stage handles."""

    def __init__(
        self,
        preprocess: Any,
        vision: Any,
        llm: Any,
        *,
        model_name: str,
        max_model_len: int,
        max_inflight: int,
        stream_interval_s: float = 0.0,
        text_args: ServeArgs | None = None,
        auth: ApiKeyAuth | None = None,
    ) -> None:
        self.preprocess = preprocess
        # With `text_args`, text-only requests are prepared here: a template and a tokenizer
        # call cost less than the hop to the Preprocess deployment, which keeps all media work.
        self.text_preparer: Any | None = (
            PreprocessDeployment(text_args) if text_args is not None else None
        )
        self.vision = vision
        self.llm = llm
        # Media requests carry pixel and embedding arrays: every hop goes by reference, so the
        # arrays move replica to replica through the object store, never through here (a
        # DeploymentResponse argument of a by-value call would be resolved here first).
        # Text-only requests carry a few KB: by value over gRPC costs about half the CPU per
        # call (1.4 vs 3.8 core-ms unary, 2.4 vs 5.9 streamed; deployments/serve_env.py).
        self._text_route = _Route(
            preprocess.options(_by_reference=False),
            None,
            llm.options(stream=True, _by_reference=False),
        )
        self._media_route = _Route(
            preprocess.options(_by_reference=True),
            vision.options(_by_reference=True),
            llm.options(stream=True, _by_reference=True),
        )
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_inflight = max_inflight
        self.stream_interval_s = stream_interval_s
        self.inflight = 0
        self.metrics = IngressMetrics()
        self.auth = auth  # None: no API keys configured, every route open

    async def __call__(self, request: Request) -> Response:
        path, method = _app_path(request), request.method
        if (refused := self._authenticate(request, path)) is not None:
            return refused
        try:
            if path == "/v1/chat/completions" and method == "POST":
                return await self._chat(request)
            if path == "/v1/models" and method == "GET":
                return self._models()
            if path in ("/health", "/v1/health") and method == "GET":
                return await self._health()
            raise ModelNotFoundError(f"no route for {method} {path}")
        except Exception as e:  # every failure becomes OpenAI error JSON
            return error_response(e)

    def _authenticate(self, request: Request, path: str) -> Response | None:
        """A 401 in OpenAI error JSON for a `/v1/*` request without a valid key, when keys are
        configured; None lets the request through (`/health` is always open)."""
        if self.auth is None or not self.auth.guards(path):
            return None
        try:
            self.auth.check(request.headers.get("authorization"))
        except AuthenticationError as e:
            response = error_response(e)
            response.headers["www-authenticate"] = "Bearer"
            return response
        return None

    def _models(self) -> JSONResponse:
        card = ModelCard(id=self.model_name, max_model_len=self.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def _health(self) -> JSONResponse:
        checks = {"preprocess": self.preprocess, "vision": self.vision, "llm": self.llm}
        status: dict[str, str] = {}
        for name, handle in checks.items():
            try:
                await asyncio.wait_for(handle.health.remote(), timeout=10)
                status[name] = "ok"
            except Exception as e:  # a stage that cannot answer is not ready
                status[name] = f"unhealthy: {type(unwrap_error(e)).__name__}"
        ready = all(v == "ok" for v in status.values())
        return JSONResponse(
            {"status": "ok" if ready else "unavailable", "stages": status},
            status_code=200 if ready else 503,
        )

    async def _parse(self, request: Request) -> ChatCompletionRequest:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise InvalidRequestError(
                f"request body has {len(body)} bytes; limit is {MAX_BODY_BYTES}"
            )
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"request body is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise InvalidRequestError("request body must be a JSON object")
        try:
            parsed = ChatCompletionRequest.model_validate(raw)
        except ValidationError as e:
            raise schema_error(e, raw) from e
        if parsed.model != self.model_name:
            raise ModelNotFoundError(
                f"model {parsed.model!r} is not served here; available: {self.model_name!r}",
                param="model",
            )
        return parsed

    async def _chat(self, request: Request) -> Response:
        if self.inflight >= self.max_inflight:
            self.metrics.request_done("overloaded", None)
            raise EngineOverloadedError(
                f"{self.inflight} requests in flight; max_inflight is {self.max_inflight}"
            )
        parsed = await self._parse(request)
        request_id, headers = _request_id(request)
        self.inflight += 1
        start = time.perf_counter()
        try:
            streams = await self._start(parsed, request_id)
            first = [await _first_event(s) for s in streams]  # errors surface before headers
        except BaseException:
            self.inflight -= 1
            raise
        if parsed.stream:
            release = _Release(self)
            body = self._stream_body(parsed, request_id, streams, first, start, release)
            # A body the server never iterates (client gone before the first byte) never runs
            # its `finally`; releasing the slot when the generator is collected covers that.
            weakref.finalize(body, release)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        try:
            response = await self._complete(parsed, request_id, streams, first, start)
            response.headers.update(headers)
            return response
        finally:
            self.inflight -= 1

    async def _start(
        self, parsed: ChatCompletionRequest, request_id: str
    ) -> list[AsyncIterator[Any]]:
        logger.debug(
            "request %s: %d messages, stream=%s", request_id, len(parsed.messages), parsed.stream
        )
        has_media = any(
            not isinstance(m.content, str | None) and any(p.type != "text" for p in m.content)
            for m in parsed.messages
        )
        route = self._media_route if has_media else self._text_route
        if has_media or self.text_preparer is None:
            prepared = route.preprocess.prepare.remote(parsed, request_id)
        else:
            prepared = await self.text_preparer.prepare(parsed, request_id)
        if route.vision is not None:  # the LLM gets the vision pool's EncodedRequest only
            prepared = route.vision.encode.remote(prepared)
        llm = route.llm
        # Non-streaming callers need only the first event (errors) and the final one.
        interval = self.stream_interval_s if parsed.stream else NON_STREAM_INTERVAL_S
        return [llm.generate.remote(prepared, None, i, interval) for i in range(parsed.n)]

    async def _complete(
        self,
        parsed: ChatCompletionRequest,
        request_id: str,
        streams: list[AsyncIterator[Any]],
        first: list[GenerationEvent],
        start: float,
    ) -> JSONResponse:
        async def drain(i: int) -> ChoiceAccumulator:
            acc = ChoiceAccumulator(i)
            acc.add(first[i])
            async for raw in streams[i]:
                acc.add(GenerationEvent.from_wire(raw))
            return acc

        accs = await asyncio.gather(*(drain(i) for i in range(len(streams))))
        self.metrics.first_token(time.perf_counter() - start)
        usage = ChoiceAccumulator.usage(accs)
        response = ChatCompletionResponse(
            id=completion_id(),
            model=self.model_name,
            choices=[acc.choice() for acc in accs],
            usage=usage,
        )
        self.metrics.request_done("ok", time.perf_counter() - start, usage.completion_tokens)
        return JSONResponse(response.model_dump(exclude_none=True))

    async def _stream_body(
        self,
        parsed: ChatCompletionRequest,
        request_id: str,
        streams: list[AsyncIterator[Any]],
        first: list[GenerationEvent],
        start: float,
        release: _Release,
    ) -> AsyncIterator[str]:
        chunk_id = completion_id()
        accs = [ChoiceAccumulator(i) for i in range(len(streams))]
        status = "ok"
        try:
            for i in range(len(streams)):
                role = ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                yield sse(
                    self._chunk(chunk_id, [role], running_usage(parsed.stream_options, accs, first))
                )
            self.metrics.first_token(time.perf_counter() - start)
            async for index, event in _merge(streams, first):
                accs[index].add(event)
                choice = accs[index].chunk_choice(event)
                if choice is not None:
                    usage = running_usage(parsed.stream_options, accs, first)
                    yield sse(self._chunk(chunk_id, [choice], usage))
            if parsed.stream_options and parsed.stream_options.include_usage:
                usage = ChoiceAccumulator.usage(accs)
                yield sse(self._chunk(chunk_id, [], usage=usage.model_dump()))
        except Exception as e:  # in-flight failure: an error event, then the stream ends
            status = "error"
            logger.warning("request %s failed mid-stream: %r", request_id, e)
            yield sse(json.loads(error_response(e).body))
        finally:
            release()
            usage = ChoiceAccumulator.usage(accs)
            self.metrics.request_done(status, time.perf_counter() - start, usage.completion_tokens)
        yield sse("[DONE]")

    def _chunk(
        self, chunk_id: str, choices: list[ChunkChoice], usage: dict[str, int] | None = None
    ) -> dict[str, Any]:
        chunk = ChatCompletionChunk(id=chunk_id, model=self.model_name, choices=choices)
        payload = chunk.model_dump(exclude_none=True)
        # OpenAI chunks always carry finish_reason (null until the last one).
        for dumped, choice in zip(payload["choices"], choices, strict=True):
            dumped["finish_reason"] = choice.finish_reason
        if usage is not None:
            payload["usage"] = usage
        return payload


def _app_path(request: Request) -> str:
    """The path below the app's route prefix (YAML `route_prefix: /internvl` serves
    `/internvl/v1/chat/completions`); ASGI servers keep the prefix in `path` as `root_path`."""
    path = request.url.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.rstrip("/")


def _request_id(request: Request) -> tuple[str, dict[str, str]]:
    """The id that logs carry end to end, and the response headers that echo the client's id.

    Serve's proxy puts `x-request-id` on every request (the client's own, else a fresh one) and
    echoes it on the response, so the header is set here only when no proxy did (a second copy
    would reach clients as "id, id"). Clients may reuse ids while a request is in flight, and the
    engine keys sequences by id, so a short unique suffix follows the client's id.
    """
    suffix = uuid.uuid4().hex[:8]
    given = request.headers.get("x-request-id")
    if given:
        return f"{given}.{suffix}", {}
    request_id = uuid.uuid4().hex
    return f"{request_id}.{suffix}", {"x-request-id": request_id}


@dataclass(frozen=True)
class _Route:
    """The stage handles one request goes through, each with its transport chosen."""

    preprocess: Any
    vision: Any | None
    llm: Any  # streaming


class _Release:
    """Gives an admitted request's slot back exactly once, whichever path gets there first."""

    def __init__(self, ingress: IngressDeployment) -> None:
        self.ingress: IngressDeployment | None = ingress

    def __call__(self) -> None:
        if self.ingress is not None:
            self.ingress.inflight -= 1
            self.ingress = None


async def _first_event(stream: AsyncIterator[Any]) -> GenerationEvent:
    try:
        return GenerationEvent.from_wire(await stream.__anext__())
    except StopAsyncIteration as e:
        raise RuntimeError("LLM stream ended without an event") from e


async def _merge(
    streams: list[AsyncIterator[Any]], first: list[GenerationEvent]
) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Interleave the n choice streams as events arrive; first events go out first."""
    for i, event in enumerate(first):
        yield i, event
    pending = [i for i, event in enumerate(first) if not event.finished]
    if len(pending) == 1:
        async for raw in streams[pending[0]]:
            yield pending[0], GenerationEvent.from_wire(raw)
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for raw in streams[i]:
                await queue.put((i, raw))
            await queue.put((i, None))
        except Exception as e:  # forwarded to the consumer below
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in pending]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, GenerationEvent.from_wire(item)
    finally:
        for task in tasks:
            task.cancel()
