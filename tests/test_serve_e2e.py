"""The Serve graph end to end (`deployments.app.build_app`) over real HTTP on 127.0.0.1: the
`openai` client and raw httpx against a local Ray cluster with logical GPUs serving the tiny
Qwen2 checkpoint; greedy answers must equal offline `InternVLChat.chat` on the same weights.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from ray import serve

from internvl_core.chat import InternVLChat
from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams
from internvl_core.preprocess.prompt import video_prefix
from internvl_core.preprocess.request import PreparedRequest, RequestPreparer
from internvl_core.protocol import ChatCompletionRequest
from internvl_core.serve_args import MediaLimits, ServeArgs
from internvl_core.tokenizer import load_tokenizer
from tests.media_factory import data_url, mp4_clip, png_bytes
from tests.serve_fixtures import (
    deployed_app,
    engine_idle,
    serve_cluster,
    tiny_serve_args,
    wait_until,
)

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MODEL = "internvl2-tiny-test"
MAX_NEW = 12
GEN = {"max_new_tokens": MAX_NEW, "do_sample": False}
MAX_IMAGE_BYTES = 64 * 1024
MAX_IMAGES = 4
MAX_MODEL_LEN = 8192
TIMEOUT_S = 60.0
EXTENSIONS = frozenset({"max_dynamic_patch", "min_tokens"})  # fields OpenAI lacks


@dataclass
class Graph:
    """A deployed app: its URL and name, the args it was built from, an OpenAI client."""

    url: str
    name: str
    args: ServeArgs
    client: OpenAI
    preparer: RequestPreparer

    def prepare(self, body: dict[str, Any]) -> PreparedRequest:
        """What the Preprocess deployment builds for `body`, computed here, offline."""
        request = ChatCompletionRequest.model_validate(body)
        return asyncio.run(self.preparer.prepare(request, "offline"))

    def post(self, body: dict[str, Any], **headers: str) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=TIMEOUT_S
        )


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    with serve_cluster(num_cpus=8, num_gpus=4, throughput_mode=True) as url:
        yield url


@pytest.fixture(scope="module")
def offline(tiny_qwen2: Path) -> InternVLChat:
    return InternVLChat.from_pretrained(tiny_qwen2, dtype="float32", keep_grounding_tokens=True)


def _graph(url: str, name: str, args: ServeArgs) -> Graph:
    arch = ModelArchitecture.from_checkpoint(args.model_path)
    preparer = RequestPreparer(
        arch, load_tokenizer(args.model_path), args.media, args.engine, args.default_sampling
    )
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    return Graph(url, name, args, client, preparer)


def chat_body(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, "max_tokens": MAX_NEW, **fields}


def user(*parts: dict[str, Any] | str) -> dict[str, Any]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {"role": "user", "content": content}


def image_part(data: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(data, "image/png")}}


def _url_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


INVALID = "invalid_request_error"
TOO_LONG = "context_length_exceeded"
# fmt: off
BAD_REQUESTS = [  # (body, status, error type, param, a fragment of the message)
    pytest.param({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
                 "model_not_found", "model", "'nope' is not served", id="unknown-model"),
    pytest.param(b'{"model": ', 400, INVALID, None, "not valid JSON", id="invalid-json"),
    pytest.param(b"[1, 2]", 400, INVALID, None, "JSON object", id="not-an-object"),
    pytest.param(chat_body([user("x")], temperature="hot"), 422, INVALID, "temperature",
                 "temperature", id="wrong-type"),
    pytest.param(chat_body([user("x")], max_tokens=0), 422, INVALID, "max_tokens",
                 "greater than or equal to 1", id="out-of-range"),
    pytest.param(chat_body([user("x")], n=9), 422, INVALID, "n", "n:", id="n-too-large"),
    pytest.param(chat_body([{"role": "robot", "content": "x"}]), 422, INVALID, "messages[0].role",
                 "role", id="bad-role"),
    pytest.param(chat_body([user("x")], best_of=2), 422, INVALID, "best_of", "Extra inputs",
                 id="unknown-field"),
    pytest.param(chat_body([user({**_url_part("data:,"), "max_dynamic_patch": 2}, "x")]), 422,
                 INVALID, "messages[0].content[0].max_dynamic_patch", "Extra inputs",
                 id="extension-field-on-the-part"),
    pytest.param(chat_body([user("x")], top_logprobs=3), 422, INVALID, "top_logprobs",
                 "requires logprobs", id="top-logprobs-alone"),
    pytest.param(chat_body([user("hello " * MAX_MODEL_LEN)]), 400, TOO_LONG, "messages",
                 f"max_model_len {MAX_MODEL_LEN}", id="prompt-too-long"),
    pytest.param(chat_body([user("x")], max_tokens=MAX_MODEL_LEN), 400, TOO_LONG, "max_tokens",
                 f"max_tokens {MAX_MODEL_LEN} alone fills", id="max-tokens-too-large"),
    pytest.param(chat_body([user(_url_part("http://10.1.2.3/cat.png"), "x")]), 400,
                 "invalid_media", "messages[0].content[0].image_url.url", "blocked (private)",
                 id="private-ip"),
    pytest.param(chat_body([user(_url_part("http://169.254.169.254/latest/meta-data"), "x")]),
                 400, "invalid_media", "messages[0].content[0].image_url.url",
                 "blocked (private)", id="metadata-ip"),
    pytest.param(chat_body([user(*[_url_part("data:image/png;base64,AA==")] * 5, "x")]), 400,
                 INVALID, "messages", f"max_images_per_request is {MAX_IMAGES}",
                 id="too-many-images"),
    pytest.param(chat_body([user(_url_part(data_url(bytes(2 * MAX_IMAGE_BYTES))), "x")]), 413,
                 "payload_too_large", "messages[0].content[0].image_url.url",
                 f"limit is {MAX_IMAGE_BYTES}", id="oversized-data-url"),
]
# fmt: on


def sse_events(lines: list[str]) -> list[dict[str, Any] | str]:
    """`data:` payloads of an SSE body in order ("[DONE]" stays a string)."""
    events: list[dict[str, Any] | str] = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_greedy_equal(graph: Graph, body: dict[str, Any], expected: str) -> None:
    """Server answer (OpenAI client, non-stream) == offline chat(); usage == offline prompt."""
    standard = {k: v for k, v in body.items() if k not in EXTENSIONS}
    extra = {k: v for k, v in body.items() if k in EXTENSIONS}
    out = graph.client.chat.completions.create(**standard, extra_body=extra or None)
    (choice,) = out.choices
    # chat() cuts at the separator and strips; the server returns the raw generated text.
    assert choice.message.content.strip() == expected
    num_out = out.usage.completion_tokens
    assert 1 <= num_out <= MAX_NEW
    # "stop" = ended on the separator, so before max_tokens unless it was the last token;
    # "length" = ran to max_tokens.
    assert choice.finish_reason in ("stop", "length")
    if num_out < MAX_NEW:
        assert choice.finish_reason == "stop"
    if choice.finish_reason == "length":
        assert num_out == MAX_NEW
    prepared = graph.prepare(body)
    assert out.usage.prompt_tokens == len(prepared.prompt_token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + num_out


def main_args(path: Path) -> ServeArgs:
    return tiny_serve_args(
        path,
        served_model_name=MODEL,
        engine=EngineConfig(max_model_len=MAX_MODEL_LEN, num_kv_blocks=1024, max_num_seqs=32),
        media=MediaLimits(max_images_per_request=MAX_IMAGES, max_image_bytes=MAX_IMAGE_BYTES),
        default_sampling=SamplingParams(max_tokens=MAX_NEW),
    )


class TestGraph:
    """One app for everything but overload (apps share route prefix "/", so one at a time)."""

    @pytest.fixture(scope="class")
    def graph(self, cluster_url: str, tiny_qwen2: Path) -> Iterator[Graph]:
        args = main_args(tiny_qwen2)
        with deployed_app(args, "e2e") as direct:
            # The ingress replica's own port, as a load balancer reaches it in `make run`'s mode.
            assert len(direct) == 1
            yield _graph(direct[0], "e2e", args)

    def test_serve_proxy_port_serves_too(self, graph: Graph, cluster_url: str) -> None:
        assert graph.url != cluster_url
        response = httpx.post(
            f"{cluster_url}/v1/chat/completions",
            json=chat_body([user("Hi there.")], max_tokens=4),
            timeout=TIMEOUT_S,
        )
        assert response.status_code == 200
        direct = graph.post(chat_body([user("Hi there.")], max_tokens=4))
        assert response.json()["choices"] == direct.json()["choices"]

    def test_models_and_health(self, graph: Graph) -> None:
        assert [m.id for m in graph.client.models.list().data] == [MODEL]
        response = httpx.get(f"{graph.url}/health", timeout=TIMEOUT_S)
        assert response.status_code == 200
        stages = {"preprocess": "ok", "vision": "ok", "llm": "ok"}
        assert response.json() == {"status": "ok", "stages": stages}

    def test_text_greedy_equals_offline(self, graph: Graph, offline: InternVLChat) -> None:
        question = "Hello, who are you?"
        body = chat_body([{"role": "user", "content": question}])
        assert_greedy_equal(graph, body, offline.chat(None, question, GEN))

    def test_stream_raw_sse_with_usage(self, graph: Graph) -> None:
        body = chat_body([user("Tell me a story.")])
        whole = graph.post(body).json()
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream(
            "POST", f"{graph.url}/v1/chat/completions", json=stream_body, timeout=TIMEOUT_S
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(list(response.iter_lines()))
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        *deltas, usage_chunk = chunks
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in deltas)
        assert text == whole["choices"][0]["message"]["content"]
        reasons = [c["choices"][0]["finish_reason"] for c in deltas]
        assert reasons[-1] == whole["choices"][0]["finish_reason"]
        assert all(r is None for r in reasons[:-1])
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"] == whole["usage"]

    def test_stream_openai_client(self, graph: Graph) -> None:
        body = chat_body([user("Count to five.")])
        whole = graph.client.chat.completions.create(**body)
        stream = graph.client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[-1].usage == whole.usage

    def test_one_image_greedy_equals_offline(self, graph: Graph, offline: InternVLChat) -> None:
        data = png_bytes(150, 90, seed=1)
        pixels = offline.load_image(data)
        assert pixels.shape[0] > 1  # dynamic tiles + thumbnail
        body = chat_body([user(image_part(data), "Describe the image.")])
        prepared = graph.prepare(body)
        assert prepared.num_image_tokens == pixels.shape[0] * offline.num_image_token
        assert_greedy_equal(graph, body, offline.chat(pixels, "Describe the image.", GEN))

    def test_two_images_greedy_equals_offline(self, graph: Graph, offline: InternVLChat) -> None:
        first, second = png_bytes(100, 100, seed=2), png_bytes(60, 140, seed=3)
        p1, p2 = offline.load_image(first), offline.load_image(second)
        body = chat_body([user(image_part(first), image_part(second), "Compare them.")])
        question = "Image-1: <image>\nImage-2: <image>\nCompare them."
        pixels = torch.cat([p1, p2])  # [tiles_1 + tiles_2, 3, S, S]
        expected = offline.chat(pixels, question, GEN, num_patches_list=[len(p1), len(p2)])
        assert_greedy_equal(graph, body, expected)

    def test_per_request_max_dynamic_patch(self, graph: Graph, offline: InternVLChat) -> None:
        data = png_bytes(150, 90, seed=4)
        pixels = offline.load_image(data, max_num=2)
        body = chat_body([user(image_part(data), "What is it?")], max_dynamic_patch=2)
        assert_greedy_equal(graph, body, offline.chat(pixels, "What is it?", GEN))

    def test_image_in_earlier_turn(self, graph: Graph, offline: InternVLChat) -> None:
        data = png_bytes(120, 80, seed=5)
        pixels = offline.load_image(data)
        messages = [
            user(image_part(data), "What is in it?"),
            {"role": "assistant", "content": "Coloured noise."},
            {"role": "user", "content": "And the colours?"},
        ]
        history = [("<image>\nWhat is in it?", "Coloured noise.")]
        expected = offline.chat(pixels, "And the colours?", GEN, history=history)
        assert_greedy_equal(graph, chat_body(messages), expected)

    def test_system_message(self, graph: Graph, tiny_qwen2: Path) -> None:
        system = "You answer in one word."
        model = InternVLChat.from_pretrained(
            tiny_qwen2, dtype="float32", system_message=system, keep_grounding_tokens=True
        )
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Why?"}]
        assert_greedy_equal(graph, chat_body(messages), model.chat(None, "Why?", GEN))

    def test_video_greedy_equals_offline(self, graph: Graph, offline: InternVLChat) -> None:
        clip = mp4_clip(20)
        pixels, num_patches = offline.load_video(io.BytesIO(clip), num_segments=4, max_num=1)
        video = {"url": data_url(clip, "video/mp4"), "num_segments": 4}
        body = chat_body([user({"type": "video_url", "video_url": video}, "What happens?")])
        question = video_prefix(4) + "What happens?"
        expected = offline.chat(pixels, question, GEN, num_patches_list=num_patches)
        assert_greedy_equal(graph, body, expected)

    def test_concurrent_requests_equal_sequential(self, graph: Graph) -> None:
        bodies = [chat_body([user(f"Question number {i}?")]) for i in range(4)]
        bodies += [
            chat_body([user(image_part(png_bytes(70 + 20 * i, 60, seed=10 + i)), "What?")])
            for i in range(4)
        ]
        sequential = [graph.post(body).json() for body in bodies]

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
                url = f"{graph.url}/v1/chat/completions"
                calls = [client.post(url, json=body) for body in bodies * 2]
                return await asyncio.gather(*calls)

        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * len(responses)
        for response, expected in zip(responses, sequential * 2, strict=True):
            got = response.json()
            assert got["choices"] == expected["choices"]
            assert got["usage"] == expected["usage"]

    def test_disconnect_mid_stream_frees_kv_blocks(self, graph: Graph) -> None:
        llm = serve.get_deployment_handle("LLM", app_name=graph.name)

        def stats() -> dict[str, Any]:
            return llm.stats.remote().result(timeout_s=TIMEOUT_S)

        # min_tokens keeps the separator masked: the request would run for many seconds.
        num_tokens = MAX_MODEL_LEN - 200
        body = chat_body(
            [user("Write a long essay.")], max_tokens=num_tokens, min_tokens=num_tokens, stream=True
        )
        url = f"{graph.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=TIMEOUT_S) as response:
            assert response.status_code == 200
            # Held in a variable: a dropped line iterator closes the response at once.
            lines = response.iter_lines()
            deltas = [line for line in itertools.islice(lines, 12) if '"content"' in line]
            assert len(deltas) == 6  # the role chunk and 5 deltas (blank lines in between)
            assert not any('"finish_reason": "' in line for line in deltas)  # still generating
            busy = stats()
            assert busy["num_running"] == 1
            assert busy["kv_blocks_free"] < busy["kv_blocks_total"]
        # Leaving the block closed the connection mid-stream.
        closed = time.monotonic()
        assert wait_until(lambda: engine_idle(stats()), timeout_s=5.0), stats()
        assert time.monotonic() - closed < 5.0

    def test_request_id_echoed_and_reusable(self, graph: Graph) -> None:
        body = chat_body([user("Hi there.")], max_tokens=4)
        response = graph.post(body, **{"x-request-id": "client-id-1"})
        assert response.status_code == 200
        assert response.headers.get_list("x-request-id") == ["client-id-1"]
        assert graph.post(body).headers.get_list("x-request-id")[0]

        async def twice() -> list[httpx.Response]:
            headers = {"x-request-id": "client-id-2"}
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
                url = f"{graph.url}/v1/chat/completions"
                long_body = {**body, "max_tokens": 64, "min_tokens": 64}
                calls = [client.post(url, json=long_body, headers=headers) for _ in range(2)]
                return await asyncio.gather(*calls)

        # A client may reuse its ids; two requests in flight with one id must both be served.
        assert [r.status_code for r in asyncio.run(twice())] == [200, 200]

    @pytest.mark.parametrize(("body", "status", "kind", "param", "fragment"), BAD_REQUESTS)
    def test_bad_request_gives_openai_error(
        self,
        graph: Graph,
        body: dict[str, Any] | bytes,
        status: int,
        kind: str,
        param: str | None,
        fragment: str,
    ) -> None:
        url = f"{graph.url}/v1/chat/completions"
        if isinstance(body, bytes):
            headers = {"content-type": "application/json"}
            response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT_S)
        else:
            response = httpx.post(url, json=body, timeout=TIMEOUT_S)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"], error["param"]) == (kind, kind, param)
        assert fragment in error["message"]

    def test_openai_client_sees_typed_errors(self, graph: Graph) -> None:
        with pytest.raises(openai.NotFoundError) as info:
            graph.client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}]
            )
        assert (info.value.status_code, info.value.param) == (404, "model")
        with pytest.raises(openai.UnprocessableEntityError) as unprocessable:
            graph.client.chat.completions.create(**chat_body([user("x")], top_p=1.5))
        assert unprocessable.value.param == "top_p"
