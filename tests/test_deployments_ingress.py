"""IngressDeployment as a plain async class: fake stage handles across the handle protocol.

The fakes script what the stages return (events with grounding text, errors, slow streams), so
the ingress's own work is tested without Ray: routing, SSE, n > 1 merging, boxes, error table,
admission control.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.requests import Request

from deployments.auth import ApiKeyAuth
from deployments.events import GenerationEvent
from deployments.ingress import IngressDeployment
from internvl_core.errors import MediaError

MODEL = "fake-model"


async def _resolve(value: Any) -> Any:
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
        await _resolve(prepared)

    async def _ok(self) -> bool:
        return True


class FakeLLM(_Options):
    """Streams `texts` as one event each; choice i gets suffix `-i`; optionally waits first."""

    def __init__(self, texts: list[str], *, delay_s: float = 0.0) -> None:
        super().__init__()
        self.texts = texts
        self.delay_s = delay_s
        self.generate = _Call(self._generate)
        self.health = _Call(self._ok)

    async def _generate(
        self, prepared: Any, embeds: Any, index: int, interval: float
    ) -> AsyncIterator[dict[str, Any]]:
        await _resolve(prepared)
        await _resolve(embeds)
        await asyncio.sleep(self.delay_s)
        for k, text in enumerate(self.texts):
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


def _ingress(llm: FakeLLM, pre: FakePreprocess | None = None, max_inflight: int = 8) -> Any:
    return IngressDeployment(
        pre or FakePreprocess(),
        FakeVision(),
        llm,
        model_name=MODEL,
        max_model_len=128,
        max_inflight=max_inflight,
    )


def _request(
    body: bytes | dict[str, Any],
    path: str = "/v1/chat/completions",
    root_path: str = "",
    headers: dict[str, str] | None = None,
) -> Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

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


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


async def _read(response: Any) -> bytes:
    if hasattr(response, "body_iterator"):
        return "".join([chunk async for chunk in response.body_iterator]).encode()
    return response.body


def _call(ingress: Any, request: Request) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        response = await ingress(request)
        return response.status_code, await _read(response)

    return asyncio.run(go())


GROUNDED = ["The <ref>cat</ref>", "<box>[[10, 20, 300, 400]]</box>", " sits"]


def test_grounding_boxes_and_usage_in_completion() -> None:
    status, raw = _call(_ingress(FakeLLM(GROUNDED)), _request(_body(n=2)))
    assert status == 200
    payload = json.loads(raw)
    first = payload["choices"][0]["message"]
    assert first["content"] == "The <ref>cat</ref><box>[[10, 20, 300, 400]]</box> sits-0"
    assert first["boxes"] == [{"ref": "cat", "box": [10, 20, 300, 400]}]
    assert payload["choices"][1]["message"]["content"].endswith("sits-1")
    assert payload["usage"] == {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}


def test_media_requests_go_by_reference_text_requests_by_value() -> None:
    pre, llm = FakePreprocess(), FakeLLM(["a", "b"])
    ingress = _ingress(llm, pre)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    media = [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]
    assert _call(ingress, _request(_body()))[0] == 200
    assert _call(ingress, _request(_body(messages=media)))[0] == 200
    # Arrays never pass through the ingress: pixels and embeddings stay in the object store.
    assert pre.calls == [("prepare", False), ("prepare", True)]
    assert ingress.vision.calls == [("encode", True)]
    assert llm.calls == [("generate", False), ("generate", True)]


def test_text_prepared_in_the_ingress_when_it_has_a_preparer() -> None:
    pre, llm = FakePreprocess(), FakeLLM(["a", "b"])
    ingress = _ingress(llm, pre)
    prepared: list[str] = []

    class LocalPreparer:
        async def prepare(self, request: Any, request_id: str) -> str:
            prepared.append(request_id)
            return request_id

    ingress.text_preparer = LocalPreparer()
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    media = [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]
    assert _call(ingress, _request(_body()))[0] == 200
    assert _call(ingress, _request(_body(messages=media)))[0] == 200
    assert len(prepared) == 1  # the text request; the media one went to the deployment
    assert pre.calls == [("prepare", True)]
    assert llm.calls == [("generate", False), ("generate", True)]


def test_stream_chunks_usage_and_done() -> None:
    body = _body(stream=True, stream_options={"include_usage": True})
    status, raw = _call(_ingress(FakeLLM(["a", "b"])), _request(body))
    assert status == 200
    events = [line.removeprefix("data: ") for line in raw.decode().splitlines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "ab-0"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_continuous_usage_stats_put_usage_so_far_on_every_chunk() -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = _body(stream=True, stream_options=options, ignore_eos=True)
    status, raw = _call(_ingress(FakeLLM(["a", "b", "c"])), _request(body))
    assert status == 200
    events = [line.removeprefix("data: ") for line in raw.decode().splitlines() if line]
    chunks = [json.loads(e) for e in events[:-1]]
    usages = [(c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"]) for c in chunks]
    assert usages == [(11, 0), (11, 1), (11, 2), (11, 3), (11, 3)]  # role, a, b, c, final
    assert all(c["usage"]["total_tokens"] == sum(u) for c, u in zip(chunks, usages, strict=True))
    plain = _body(stream=True, stream_options={"include_usage": True})
    _, raw = _call(_ingress(FakeLLM(["a", "b"])), _request(plain))
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines() if "{" in line]
    assert ["usage" in c for c in chunks] == [False, False, False, True]


def test_stage_error_maps_to_openai_error_with_param() -> None:
    error = MediaError("image could not be decoded", param="messages[0].content[0].image_url.url")
    status, raw = _call(_ingress(FakeLLM(["x"]), FakePreprocess(error)), _request(_body()))
    assert status == 400
    assert json.loads(raw)["error"] == {
        "message": "image could not be decoded",
        "type": "invalid_media",
        "param": "messages[0].content[0].image_url.url",
        "code": "invalid_media",
    }


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{", 400, None),
        ({**_body(), "model": "other"}, 404, "model"),
        ({**_body(), "temperature": 9}, 422, "temperature"),
    ],
)
def test_request_errors(body: bytes | dict[str, Any], status: int, param: str | None) -> None:
    code, raw = _call(_ingress(FakeLLM(["x"])), _request(body))
    assert code == status and json.loads(raw)["error"]["param"] == param


def test_admission_limit_gives_503_with_retry_after() -> None:
    ingress = _ingress(FakeLLM(["x"], delay_s=0.3), max_inflight=1)

    async def go() -> list[Any]:
        return await asyncio.gather(ingress(_request(_body())), ingress(_request(_body())))

    first, second = asyncio.run(go())
    assert sorted([first.status_code, second.status_code]) == [200, 503]
    refused = first if first.status_code == 503 else second
    assert refused.headers["retry-after"] == "1"
    assert ingress.inflight == 0


def test_models_and_health_routes() -> None:
    ingress = _ingress(FakeLLM(["x"]))
    status, raw = _call(ingress, _request(b"", path="/v1/models"))
    assert status == 200 and json.loads(raw)["data"][0]["id"] == MODEL
    status, raw = _call(ingress, _request(b"", path="/health"))
    assert status == 200 and json.loads(raw)["status"] == "ok"


def test_routes_below_the_apps_route_prefix() -> None:
    ingress = _ingress(FakeLLM(["x"]))
    status, raw = _call(ingress, _request(b"", path="/v1/models", root_path="/internvl"))
    assert status == 200 and json.loads(raw)["data"][0]["id"] == MODEL
    status, raw = _call(ingress, _request(_body(), root_path="/internvl"))
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "x-0"
    status, raw = _call(ingress, _request(b"", path="/internvl/v1/models"))
    assert status == 404 and "/internvl/v1/models" in json.loads(raw)["error"]["message"]


def test_stream_never_sent_still_frees_its_slot() -> None:
    ingress = _ingress(FakeLLM(["a", "b"]), max_inflight=1)

    async def go() -> None:
        response = await ingress(_request(_body(stream=True)))
        assert response.status_code == 200 and ingress.inflight == 1
        del response  # the client left before the server iterated the body

    asyncio.run(go())
    gc.collect()
    assert ingress.inflight == 0


KEY = "sk-test-0123456789abcdef"


def test_api_keys_guard_v1_routes_and_leave_health_open(caplog: pytest.LogCaptureFixture) -> None:
    ingress = _ingress(FakeLLM(["x"]))
    ingress.auth = ApiKeyAuth(["other-key", KEY])
    caplog.set_level("DEBUG")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path, body in (("/v1/chat/completions", _body()), ("/v1/models", b"")):
            status, raw = _call(ingress, _request(body, path=path, headers=headers))
            error = json.loads(raw)["error"]
            assert status == 401 and error["type"] == "authentication_error", (headers, path)
            assert KEY not in raw.decode() and "wrong" not in raw.decode()
    refused = asyncio.run(ingress(_request(_body(), headers={"authorization": "Bearer nope"})))
    assert refused.headers["www-authenticate"] == "Bearer"
    right = {"Authorization": f"Bearer {KEY}"}
    status, raw = _call(ingress, _request(_body(), headers=right))
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "x-0"
    assert _call(ingress, _request(b"", path="/v1/models", headers=right))[0] == 200
    assert _call(ingress, _request(b"", path="/health"))[0] == 200
    assert any(r.name == "deployments.ingress" for r in caplog.records)  # requests were logged
    assert KEY not in caplog.text and "Bearer" not in caplog.text
