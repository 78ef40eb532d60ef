"""response_format over HTTP: IngressDeployment as a plain class over the real Preprocess and LLM
deployments (tiny Qwen2, no Ray) and the real vision encoder behind a plain adapter (Serve's
`@serve.batch` needs a replica), streamed and not, with text, an image and a video.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from starlette.requests import Request

from deployments.events import EmbeddingPayload, EncodedRequest
from deployments.ingress import IngressDeployment
from deployments.llm import LLMDeployment
from deployments.preprocess import PreprocessDeployment
from internvl_core.config import EngineConfig
from internvl_core.preprocess.request import PreparedRequest
from internvl_core.serve_args import ServeArgs
from internvl_core.vision import VisionEncoder
from tests.media_factory import data_url, mp4_clip, png_bytes

MODEL = "tiny-structured"
SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "receipt"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
        "labels": {
            "type": "array",
            "maxItems": 3,
            "items": {"type": "string", "pattern": "^[a-z]{2,6}$"},
        },
    },
    "required": ["kind", "count", "labels"],
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA}}


class _Handle:
    """`handle.options(...).method.remote(*args)` over a plain object, resolving awaitable
    arguments first as Serve does; unary calls become shared futures."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def options(self, **kwargs: Any) -> _Handle:
        return self

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.target, name)
        handle = self

        class _Method:
            def remote(self, *args: Any) -> Any:
                if inspect.isasyncgenfunction(method):
                    return handle._stream(method, args)
                return asyncio.ensure_future(handle._unary(method, args))

        return _Method()

    @staticmethod
    async def _resolve(args: tuple[Any, ...]) -> list[Any]:
        return [await a if inspect.isawaitable(a) else a for a in args]

    async def _unary(self, method: Any, args: tuple[Any, ...]) -> Any:
        return await method(*await self._resolve(args))

    async def _stream(self, method: Any, args: tuple[Any, ...]) -> AsyncIterator[Any]:
        async for item in method(*await self._resolve(args)):
            yield item


class _Vision:
    """The vision pool's `encode` without `@serve.batch`: the real encoder, one call."""

    def __init__(self, path: str) -> None:
        self.encoder = VisionEncoder.from_checkpoint(path, dtype=torch.float32)

    async def encode(self, prepared: PreparedRequest) -> EncodedRequest:
        if not prepared.images:
            return EncodedRequest.of(prepared, None)
        rows = [self.encoder.encode(image.tiles) for image in prepared.images]
        flat = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])  # [N_img, D]
        return EncodedRequest.of(prepared, EmbeddingPayload.from_tensor(flat))

    async def health(self) -> bool:
        return True


@pytest.fixture(scope="module")
def ingress(tiny_qwen2: Path) -> IngressDeployment:
    engine = EngineConfig(block_size=4, num_kv_blocks=1024, max_num_seqs=16)
    args = ServeArgs(
        model_path=str(tiny_qwen2), served_model_name=MODEL, dtype="float32", engine=engine
    )
    return IngressDeployment(
        _Handle(PreprocessDeployment(args)),
        _Handle(_Vision(str(tiny_qwen2))),
        _Handle(LLMDeployment(args)),
        model_name=MODEL,
        max_model_len=engine.max_model_len,
        max_inflight=16,
    )


def _request(body: dict[str, Any]) -> Request:
    raw, sent = json.dumps(body).encode(), False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)  # the client stays connected
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "root_path": "",
        "headers": [],
        "query_string": b"",
    }
    return Request(scope, receive)


def _post(ingress: IngressDeployment, body: dict[str, Any]) -> tuple[int, str]:
    async def go() -> tuple[int, str]:
        response = await ingress(_request(body))
        if hasattr(response, "body_iterator"):
            chunks = [c async for c in response.body_iterator]
            text = "".join(c if isinstance(c, str) else c.decode() for c in chunks)
            return response.status_code, text
        return response.status_code, response.body.decode()

    return asyncio.run(go())


def _body(content: Any, **fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 200,
        "response_format": JSON_SCHEMA,
        **fields,
    }


def _streamed(raw: str) -> list[tuple[str, str | None]]:
    """(text, finish_reason) per choice index from an SSE body."""
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    for line in raw.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[len("data: ") :])["choices"]:
            index = choice["index"]
            texts[index] = texts.get(index, "") + (choice["delta"].get("content") or "")
            reasons[index] = choice["finish_reason"] or reasons.get(index)
    return [(texts[i], reasons[i]) for i in sorted(texts)]


IMAGE = [
    {"type": "image_url", "image_url": {"url": data_url(png_bytes(80, 60, seed=3))}},
    {"type": "text", "text": "What is in the image?"},
]
VIDEO = [
    {"type": "video_url", "video_url": {"url": data_url(mp4_clip(8), "video/mp4")}},
    {"type": "text", "text": "Describe the video."},
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("content", "extra"),
    [
        ("Describe a scene as JSON.", {"temperature": 1.0, "seed": 7, "n": 2}),
        (IMAGE, {}),
        (VIDEO, {"temperature": 0.8, "seed": 1}),
    ],
    ids=["text", "image", "video"],
)
def test_response_format_validates(
    ingress: IngressDeployment, content: Any, extra: dict[str, Any], stream: bool
) -> None:
    status, raw = _post(ingress, _body(content, stream=stream, **extra))
    assert status == 200, raw
    if stream:
        outputs = _streamed(raw)
    else:
        choices = json.loads(raw)["choices"]
        outputs = [(c["message"]["content"], c["finish_reason"]) for c in choices]
    assert len(outputs) == extra.get("n", 1)
    for text, reason in outputs:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_text_formats(ingress: IngressDeployment) -> None:
    status, raw = _post(ingress, _body("hi", response_format={"type": "text"}, max_tokens=4))
    assert status == 200 and json.loads(raw)["choices"][0]["finish_reason"] == "length"
    body = _body("hi", response_format={"type": "json_object"}, max_tokens=8)
    status, raw = _post(ingress, body)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"].startswith("{")


@pytest.mark.parametrize(
    ("response_format", "status"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, 400),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(x"}},
            },
            400,
        ),
        ({"type": "json_schema"}, 422),  # no json_schema
        ({"type": "yaml"}, 422),
    ],
)
def test_bad_response_format_names_it(
    ingress: IngressDeployment, response_format: dict[str, Any], status: int
) -> None:
    code, raw = _post(ingress, _body("hi", response_format=response_format))
    error = json.loads(raw)["error"]
    assert code == status, raw
    assert error["param"].startswith("response_format"), error
