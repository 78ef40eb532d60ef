"""Property test of the `make run` configuration (issue 11, "done when"): legal requests across
the whole allowed range of tiles per image (max_dynamic_patch up to its limit, very tall and wide
images), images and video frames per request and sampling fields never get a 5xx.

The app is serve_configs/tiny.yaml's `args:` as written, on the tiny Qwen2 checkpoint that
`make tiny` makes. A legal request may still be refused (a tile budget, the context length): a
4xx with OpenAI error JSON is fine; a 5xx, a broken stream or a hang is not.
"""

from __future__ import annotations

import base64
import copy
import functools
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from internvl_core.serve_args import ServeArgs
from tests import media_factory as mf
from tests.serve_fixtures import deployed_app, serve_cluster

pytestmark = [pytest.mark.serve, pytest.mark.slow]

logger = logging.getLogger(__name__)

TINY_YAML = Path(__file__).resolve().parents[1] / "serve_configs" / "tiny.yaml"
APP = "properties"
TIMEOUT_S = 60.0
MAX_EXAMPLES = 100  # about 30 s of requests on 2 cores
MAX_NEW = 4  # max_tokens stays small: the test is about admission and tiles, not decoding
MAX_PATCH = 40  # the protocol's max_dynamic_patch limit
ERROR_KEYS = {"message", "type", "param", "code"}


def tiny_yaml_args(model_path: Path) -> ServeArgs:
    """tiny.yaml's `args:` unchanged but for the checkpoint folder."""
    (app,) = yaml.safe_load(TINY_YAML.read_text())["applications"]
    return ServeArgs.model_validate({**app["args"], "model_path": str(model_path)})


@dataclass(frozen=True)
class App:
    url: str
    model: str
    args: ServeArgs = field(repr=False)


@pytest.fixture(scope="module")
def app(tiny_qwen2: Path) -> Iterator[App]:
    args = tiny_yaml_args(tiny_qwen2)
    with serve_cluster(num_cpus=8, num_gpus=0) as url, deployed_app(args, APP):
        yield App(f"{url}/v1/chat/completions", args.model_name, args)


# ---- legal requests ------------------------------------------------------------------------------
# Images: any size up to 2000 px a side, common and extreme aspect ratios (1 x 2000 is legal).
# Tiling picks the tile grid nearest the aspect ratio, preferring more tiles when the image has
# the pixels, so large images of a grid's ratio give max_dynamic_patch + 1 tiles.
_LONG_SIDE = st.integers(1, 2000) | st.sampled_from([56, 100, 448, 1000, 1600, 2000])
_RATIO = st.tuples(st.integers(1, 2000), st.integers(1, 2000)) | st.sampled_from(
    [(1, 1), (4, 3), (3, 4), (3, 2), (16, 10), (10, 16), (16, 9), (2, 1), (1, 10), (40, 1)]
)
_PATCH = st.integers(1, MAX_PATCH) | st.sampled_from([32, 33, 36, MAX_PATCH])


@functools.cache
def _png_url(width: int, height: int, seed: int) -> str:
    """A PNG of a few flat bands (small to send, distinct per seed: no cache hit hides work)."""
    image = Image.new("RGB", (width, height), (seed * 37 % 256, seed * 91 % 256, 120))
    image.paste((255, 255, 255), (0, 0, max(1, width // 3), max(1, height // 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


CLIP = "mp4:12 frames"  # rendered when sent


@functools.cache
def _clip_url() -> str:
    return mf.data_url(mf.mp4_clip(12, width=32, height=32), "video/mp4")


def render(body: dict[str, Any]) -> dict[str, Any]:
    """The request as sent: media placeholders (compact in hypothesis's reports) as data URLs."""
    body = copy.deepcopy(body)
    for part in body["messages"][-1]["content"]:
        if part["type"] == "image_url":
            size, seed = part["image_url"]["url"].removeprefix("png:").split(":")
            width, height = size.split("x")
            part["image_url"]["url"] = _png_url(int(width), int(height), int(seed))
        elif part["type"] == "video_url":
            part["video_url"]["url"] = _clip_url()
    return body


@st.composite
def image_parts(draw: st.DrawFn) -> dict[str, Any]:
    (ratio_w, ratio_h), long_side, seed = draw(_RATIO), draw(_LONG_SIDE), draw(st.integers(0, 7))
    scale = long_side / max(ratio_w, ratio_h)
    width, height = max(1, round(ratio_w * scale)), max(1, round(ratio_h * scale))
    image_url: dict[str, Any] = {"url": f"png:{width}x{height}:{seed}"}  # rendered when sent
    image_url.update(
        draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "detail": st.sampled_from(["auto", "low", "high"]),
                    "max_dynamic_patch": _PATCH,
                },
            )
        )
    )
    return {"type": "image_url", "image_url": image_url}


def video_parts() -> st.SearchStrategy[dict[str, Any]]:
    optional = {
        "num_segments": st.integers(1, 32),
        "bound": st.tuples(st.floats(0, 0.5), st.floats(0.6, 1.2)),
        "max_dynamic_patch": st.integers(1, MAX_PATCH),
    }
    video = st.fixed_dictionaries({"url": st.just(CLIP)}, optional=optional)
    return st.fixed_dictionaries({"type": st.just("video_url"), "video_url": video})


_TEXT = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["Describe the image.", "<image>", "<img>", "<IMG_CONTEXT>", "<ref>a</ref>"]
)
_SAMPLING: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.floats(0.0, 2.0),
    "top_p": st.floats(0.01, 1.0),
    "top_k": st.integers(0, 100),
    "min_p": st.floats(0.0, 1.0),
    "max_tokens": st.integers(1, MAX_NEW),
    "min_tokens": st.integers(0, MAX_NEW),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "n": st.integers(1, 8),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "repetition_penalty": st.floats(0.01, 2.0),
    "max_dynamic_patch": _PATCH,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}


@st.composite
def legal_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A chat request every field of which is in range: up to 16 images and video clips (the
    images + frames limit), each image any size and aspect ratio and tile setting."""
    media = draw(
        st.lists(image_parts() | video_parts(), max_size=4) | st.lists(image_parts(), max_size=16)
    )
    parts = [*media, {"type": "text", "text": draw(_TEXT)}]
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_TEXT)})
    if draw(st.booleans()):
        messages += [
            {"role": "user", "content": draw(_TEXT)},
            {"role": "assistant", "content": draw(_TEXT)},
        ]
    messages.append({"role": "user", "content": parts})
    fields = draw(st.fixed_dictionaries({}, optional=_SAMPLING))
    if fields.get("top_logprobs"):
        fields["logprobs"] = True
    if fields.get("max_tokens", MAX_NEW) < fields.get("min_tokens", 0):
        fields["min_tokens"] = fields["max_tokens"]
    return {"max_tokens": MAX_NEW, **fields, "model": "", "messages": messages}


def problem(response: httpx.Response) -> str | None:
    """What is wrong with a response to a legal request, or None."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code != 200:
        error = response.json().get("error")
        ok = isinstance(error, dict) and set(error) == ERROR_KEYS and error["message"]
        return None if ok else f"{response.status_code} not OpenAI error JSON: {response.text}"
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
        bad = events[-1] != "[DONE]" or any(e.startswith('{"error"') for e in events)
        return f"bad stream: {events[-3:]}" if bad else None
    return None


def _image(width: int, height: int, patch: int) -> dict[str, Any]:
    url = f"png:{width}x{height}:0"
    return {"type": "image_url", "image_url": {"url": url, "max_dynamic_patch": patch}}


@pytest.mark.parametrize(("width", "height"), [(1600, 1000), (100, 1000)])
def test_issue_requests_get_200(app: App, width: int, height: int) -> None:
    """Issue 11's two requests: 41 tiles, over tiny.yaml's vision.max_batch_tiles of 32."""
    content = [_image(width, height, MAX_PATCH), {"type": "text", "text": "Describe."}]
    body = {"model": app.model, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    response = httpx.post(app.url, json=render(body), timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text[:300]


@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.generate,),  # no shrinking: every example is a live request
    suppress_health_check=list(HealthCheck),
)
@given(body=legal_requests())
def test_legal_requests_never_get_5xx(app: App, body: dict[str, Any]) -> None:
    response = httpx.post(app.url, json=render({**body, "model": app.model}), timeout=TIMEOUT_S)
    found = problem(response)
    assert found is None, f"{found} <- {json.dumps(body)}"
