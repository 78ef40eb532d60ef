"""The vision pool through Serve (tiny Qwen2, CPU): images with more tiles than a batch holds get a
200 and the answer of the unchunked offline model; identical images in flight are encoded once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from ray import serve

from internvl_core.chat import InternVLChat
from internvl_core.config import EngineConfig, SamplingParams
from internvl_core.serve_args import VisionServeConfig
from tests import media_factory as mf
from tests.request_strategies import MAX_NEW, MODEL, chat_body, image
from tests.serve_fixtures import deployed_app, serve_cluster, tiny_serve_args

pytestmark = [pytest.mark.serve, pytest.mark.slow]

APP, TIMEOUT_S = "vision", 60.0
GEN = {"max_new_tokens": MAX_NEW, "do_sample": False}
TINY_YAML = Path(__file__).resolve().parents[1] / "serve_configs" / "tiny.yaml"
# Issue 11: 41 tiles each at max_dynamic_patch 40 (8 x 5 and, with 56 px tiles, 2 x 20, each +1
# thumbnail), over `make run`'s max_batch_tiles; Ray refused them as one batch item (HTTP 500).
OVERSIZED = {"wide-1600x1000": (1600, 1000), "tall-100x1000": (100, 1000)}
NUM_TILES = 41
BATCH_WAIT_S = 1.0  # long enough that concurrent requests overlap in the encoder's queue


def _tiny_yaml_vision() -> dict[str, Any]:
    (app,) = yaml.safe_load(TINY_YAML.read_text())["applications"]
    return dict(app["args"]["vision"])


@functools.cache
def _png(width: int, height: int, seed: int) -> bytes:
    return mf.png_bytes(width, height, seed=seed)


@pytest.fixture(scope="module")
def url(tiny_qwen2: Path) -> Iterator[str]:
    vision = VisionServeConfig(**{**_tiny_yaml_vision(), "batch_wait_timeout_s": BATCH_WAIT_S})
    assert vision.max_batch_tiles < NUM_TILES
    args = tiny_serve_args(
        tiny_qwen2,
        served_model_name=MODEL,
        engine=EngineConfig(max_model_len=512, num_kv_blocks=256, max_num_seqs=16),
        vision=vision,
        default_sampling=SamplingParams(max_tokens=MAX_NEW),
    )
    with serve_cluster(num_cpus=4, num_gpus=0) as base, deployed_app(args, APP):
        yield base


@pytest.fixture(scope="module")
def offline(tiny_qwen2: Path) -> InternVLChat:
    return InternVLChat.from_pretrained(tiny_qwen2, dtype="float32")


def _post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)


def _vision_stats() -> dict[str, int]:
    handle = serve.get_deployment_handle("VisionEncoder", app_name=APP)
    return handle.stats.remote().result(timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("name", list(OVERSIZED))
def test_image_over_max_batch_tiles_is_served(url: str, offline: InternVLChat, name: str) -> None:
    data = _png(*OVERSIZED[name], seed=7)
    pixels = offline.load_image(data, max_num=40)  # [41, 3, S, S], encoded in one forward
    assert pixels.shape[0] == NUM_TILES
    before = _vision_stats()
    body = chat_body(image(mf.data_url(data)), "Describe.", max_dynamic_patch=40)
    response = _post(url, body)
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]["message"]["content"]
    assert answer.strip() == offline.chat(pixels, "Describe.", GEN)  # chunked = unchunked
    assert _vision_stats()["encoded_tiles"] == before["encoded_tiles"] + NUM_TILES


def test_identical_images_in_flight_are_encoded_once(url: str) -> None:
    data = _png(1600, 1000, seed=8)
    body = chat_body(image(mf.data_url(data)), "Describe.", max_dynamic_patch=40)
    before = _vision_stats()
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: _post(url, body), range(4)))
    assert [r.status_code for r in responses] == [200] * 4, responses[0].text
    answers = {r.json()["choices"][0]["message"]["content"] for r in responses}
    assert len(answers) == 1
    after = _vision_stats()
    assert after["encoded_tiles"] - before["encoded_tiles"] == NUM_TILES
    shared = after["inflight_joins"] - before["inflight_joins"]
    hits = after["cache_hits"] - before["cache_hits"]
    assert shared + hits == 3 and shared >= 1, (shared, hits)
