"""IngressDeployment as a plain async class: fake stage handles across the handle protocol.

The ingress's own work is tested without Ray: routing, SSE, n > 1 merging, boxes, the error
table, admission (taken before the body is read), and the outcome of every chat request counted
once with its TTFT and TPOT.
"""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.ingress import error_response
from internvl_core.errors import MediaError
from tests.ingress_fakes import (
    MODEL,
    FakeLLM,
    FakePreprocess,
    call,
    chat_body,
    chunked_request,
    make_ingress,
    make_request,
)

GROUNDED = ["The <ref>cat</ref>", "<box>[[10, 20, 300, 400]]</box>", " sits"]


def test_grounding_boxes_and_usage_in_completion() -> None:
    status, raw = call(make_ingress(FakeLLM(GROUNDED)), make_request(chat_body(n=2)))
    assert status == 200
    payload = json.loads(raw)
    first = payload["choices"][0]["message"]
    assert first["content"] == "The <ref>cat</ref><box>[[10, 20, 300, 400]]</box> sits-0"
    assert first["boxes"] == [{"ref": "cat", "box": [10, 20, 300, 400]}]
    assert payload["choices"][1]["message"]["content"].endswith("sits-1")
    assert payload["usage"] == {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}


def test_media_requests_go_by_reference_text_requests_by_value() -> None:
    pre, llm = FakePreprocess(), FakeLLM(["a", "b"])
    ingress = make_ingress(llm, pre)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    media = [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]
    assert call(ingress, make_request(chat_body()))[0] == 200
    assert call(ingress, make_request(chat_body(messages=media)))[0] == 200
    # Arrays never pass through the ingress: pixels and embeddings stay in the object store.
    assert pre.calls == [("prepare", False), ("prepare", True)]
    assert ingress.vision.calls == [("encode", True)]
    assert llm.calls == [("generate", False), ("generate", True)]


def test_text_prepared_in_the_ingress_when_it_has_a_preparer() -> None:
    pre, llm = FakePreprocess(), FakeLLM(["a", "b"])
    ingress = make_ingress(llm, pre)
    prepared: list[str] = []

    class LocalPreparer:
        async def prepare(self, request: Any, request_id: str) -> str:
            prepared.append(request_id)
            return request_id

    ingress.text_preparer = LocalPreparer()
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    media = [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]
    assert call(ingress, make_request(chat_body()))[0] == 200
    assert call(ingress, make_request(chat_body(messages=media)))[0] == 200
    assert len(prepared) == 1  # the text request; the media one went to the deployment
    assert pre.calls == [("prepare", True)]
    assert llm.calls == [("generate", False), ("generate", True)]


def test_stream_chunks_usage_and_done() -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    status, raw = call(make_ingress(FakeLLM(["a", "b"])), make_request(body))
    assert status == 200
    events = [line.removeprefix("data: ") for line in raw.decode().splitlines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "ab-0"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_stage_error_maps_to_openai_error_with_param() -> None:
    error = MediaError("image could not be decoded", param="messages[0].content[0].image_url.url")
    status, raw = call(
        make_ingress(FakeLLM(["x"]), FakePreprocess(error)), make_request(chat_body())
    )
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
        ({**chat_body(), "model": "other"}, 404, "model"),
        ({**chat_body(), "temperature": 9}, 422, "temperature"),
    ],
)
def test_request_errors(body: bytes | dict[str, Any], status: int, param: str | None) -> None:
    code, raw = call(make_ingress(FakeLLM(["x"])), make_request(body))
    assert code == status and json.loads(raw)["error"]["param"] == param


def test_admission_limit_gives_503_with_retry_after() -> None:
    ingress = make_ingress(FakeLLM(["x"], delay_s=0.3), max_inflight=1)

    async def go() -> list[Any]:
        return await asyncio.gather(
            ingress(make_request(chat_body())), ingress(make_request(chat_body()))
        )

    first, second = asyncio.run(go())
    assert sorted([first.status_code, second.status_code]) == [200, 503]
    refused = first if first.status_code == 503 else second
    assert refused.headers["retry-after"] == "1"
    assert ingress.inflight == 0


def test_models_and_health_routes() -> None:
    ingress = make_ingress(FakeLLM(["x"]))
    status, raw = call(ingress, make_request(b"", path="/v1/models"))
    assert status == 200 and json.loads(raw)["data"][0]["id"] == MODEL
    status, raw = call(ingress, make_request(b"", path="/health"))
    assert status == 200 and json.loads(raw)["status"] == "ok"


def test_routes_below_the_apps_route_prefix() -> None:
    ingress = make_ingress(FakeLLM(["x"]))
    status, raw = call(ingress, make_request(b"", path="/v1/models", root_path="/internvl"))
    assert status == 200 and json.loads(raw)["data"][0]["id"] == MODEL
    status, raw = call(ingress, make_request(chat_body(), root_path="/internvl"))
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "x-0"
    status, raw = call(ingress, make_request(b"", path="/internvl/v1/models"))
    assert status == 404 and "/internvl/v1/models" in json.loads(raw)["error"]["message"]


def test_stream_never_sent_still_frees_its_slot() -> None:
    ingress = make_ingress(FakeLLM(["a", "b"]), max_inflight=1)

    async def go() -> None:
        response = await ingress(make_request(chat_body(stream=True)))
        assert response.status_code == 200 and ingress.inflight == 1
        del response  # the client left before the server iterated the body

    asyncio.run(go())
    gc.collect()
    assert ingress.inflight == 0


def test_stream_never_sent_counts_as_a_disconnect() -> None:
    ingress = make_ingress(FakeLLM(["a", "b"]))

    async def go() -> None:
        response = await ingress(make_request(chat_body(stream=True)))
        del response

    asyncio.run(go())
    gc.collect()
    assert ingress.metrics.statuses == ["499"]


def test_admission_is_taken_before_the_body_is_read() -> None:
    """A client still uploading holds its slot: the next request is refused at once."""
    ingress = make_ingress(FakeLLM(["x"]), max_inflight=1)
    gate = asyncio.Event()
    body = json.dumps(chat_body()).encode()

    async def go() -> tuple[int, int]:
        slow, _ = chunked_request([body], gate=gate)
        uploading = asyncio.create_task(ingress(slow))
        await asyncio.sleep(0.05)  # the first request waits in its body read
        refused = await ingress(make_request(chat_body()))
        gate.set()
        return refused.status_code, (await uploading).status_code

    assert asyncio.run(go()) == (503, 200)
    assert ingress.inflight == 0
    assert sorted(ingress.metrics.statuses) == ["200", "503"]


def test_body_over_the_limit_is_refused_while_reading() -> None:
    ingress = make_ingress(FakeLLM(["x"]), max_body_bytes=1000)
    request, pulled = chunked_request([b" " * 400] * 50)  # 20 kB, no Content-Length
    status, raw = call(ingress, request)
    assert status == 413 and "1000" in json.loads(raw)["error"]["message"]
    assert sum(pulled) <= 1200  # stopped at the chunk that passed the limit
    assert ingress.inflight == 0 and ingress.metrics.statuses == ["413"]


def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    ingress = make_ingress(FakeLLM(["x"]), max_body_bytes=1000)
    request, pulled = chunked_request([b" " * 400] * 5, headers={"content-length": "2000"})
    status, raw = call(ingress, request)
    assert status == 413 and pulled == []
    assert json.loads(raw)["error"]["message"] == (
        "request body has 2000 bytes; the limit is 1000 bytes"
    )


@pytest.mark.parametrize(
    ("exc", "status", "retry_after"),
    [
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), 503, "1"),
        (BackPressureError(9, 8, status_code=429, retry_after_s=4), 429, "4"),
        (DeploymentUnavailableError(DeploymentID(name="LLM", app_name="app")), 503, "1"),
    ],
)
def test_serve_back_pressure_by_exception_type(
    exc: Exception, status: int, retry_after: str
) -> None:
    response = error_response(exc)
    assert response.status_code == status and response.headers["retry-after"] == retry_after
    assert json.loads(response.body)["error"]["type"] == "overloaded"


def test_a_lookalike_class_name_is_not_back_pressure() -> None:
    lookalike = type("BackPressureError", (Exception,), {})
    assert error_response(lookalike("not Serve's")).status_code == 500


def test_every_outcome_is_counted_once() -> None:
    ingress = make_ingress(FakeLLM(["a", "b"]))
    requests = [
        make_request(chat_body()),
        make_request(chat_body(stream=True)),
        make_request(b"{"),
        make_request({**chat_body(), "model": "other"}),
        make_request({**chat_body(), "temperature": 9}),
        chunked_request([b"{"], disconnect=True)[0],  # left during the upload
    ]
    for request in requests:
        call(ingress, request)
    failing = make_ingress(FakeLLM(["x"]), FakePreprocess(RuntimeError("boom")))
    call(failing, make_request(chat_body()))
    statuses = ingress.metrics.statuses + failing.metrics.statuses
    assert statuses == ["200", "200", "400", "404", "422", "499", "500"]


def test_client_gone_while_waiting_counts_499() -> None:
    ingress = make_ingress(FakeLLM(["x"], delay_s=5.0))

    async def go() -> None:
        task = asyncio.create_task(ingress(make_request(chat_body())))
        await asyncio.sleep(0.05)
        task.cancel()  # Serve cancels the replica's task when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert ingress.metrics.statuses == ["499"] and ingress.inflight == 0


def test_mid_stream_failure_counts_its_error_status() -> None:
    class Failing(FakeLLM):
        async def _generate(self, *args: Any) -> Any:
            async for event in super()._generate(*args):
                yield event
                raise RuntimeError("stage died")

    ingress = make_ingress(Failing(["a", "b"]))
    status, raw = call(ingress, make_request(chat_body(stream=True)))
    assert status == 200 and b"internal_error" in raw
    assert ingress.metrics.statuses == ["500"]


@pytest.mark.parametrize("stream", [False, True])
def test_ttft_and_tpot_for_streaming_and_not(stream: bool) -> None:
    """TTFT ends at the first token, not the last; TPOT = (end - first) / (tokens - 1)."""
    ingress = make_ingress(FakeLLM(["a", "b", "c"], delay_s=0.05, gap_s=0.1))
    assert call(ingress, make_request(chat_body(stream=stream, n=2)))[0] == 200
    (ttft,) = ingress.metrics.ttfts
    assert 0.05 <= ttft < 0.15
    assert len(ingress.metrics.tpots) == 2  # one per choice
    assert all(0.09 <= tpot < 0.2 for tpot in ingress.metrics.tpots)
