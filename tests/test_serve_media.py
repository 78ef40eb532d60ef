"""Media over HTTP against the running Serve graph (tiny Qwen2, CPU): embedding reuse by content
hash, tile and token budgets, hostile inputs refused in bounded time with OpenAI error JSON, and
1,000+ hypothesis-generated request bodies that never get a 5xx or hang.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from aiohttp import web
from ray import serve

from internvl_core.chat import InternVLChat
from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams
from internvl_core.preprocess.prompt import build_query, expand_image_placeholders, get_template
from internvl_core.serve_args import MediaLimits
from internvl_core.tokenizer import Tokenizer, load_tokenizer
from tests import media_factory as mf
from tests.local_media_host import local_media_host
from tests.request_strategies import MAX_NEW, METADATA, MODEL, chat_body, collect_bodies, image
from tests.serve_fixtures import deployed_app, serve_cluster, tiny_serve_args, wait_until

pytestmark = [pytest.mark.serve, pytest.mark.slow]
logger = logging.getLogger(__name__)

Body = dict[str, Any]
APP, MAX_MODEL_LEN = "media", 512
MAX_IMAGE_BYTES, MAX_IMAGES, MAX_TILES = 200_000, 8, 16
FETCH_TIMEOUT_S, TIMEOUT_S = 1.0, 30.0
GEN = {"max_new_tokens": MAX_NEW, "do_sample": False}
ERROR_KEYS = {"message", "type", "param", "code"}
PART0 = "messages[0].content[0]"


@functools.cache
def png(name: str) -> bytes:
    """Test images: 'ok' (60x40), 'reuse' (150x90), 'wide' (168x112: 3/5/7 tiles at 2/4/12)."""
    width, height, seed = {"ok": (60, 40, 1), "reuse": (150, 90, 21), "wide": (168, 112, 31)}[name]
    return mf.png_bytes(width, height, seed=seed)


# ---- a local media host on 127.0.0.1 (trusted by this app only) and 127.0.0.2 (not) ---------


@dataclass
class MediaServer:
    """Serves test media on both loopback addresses (one port); counts hits as 'ip/path'."""

    port: int = 0
    hits: Counter[str] = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        local_ip = request.transport.get_extra_info("sockname")[0]  # type: ignore[union-attr]
        self.hits[f"{local_ip}{request.path}"] += 1
        if request.path == "/redirect":
            raise web.HTTPFound(request.query["to"].replace("PORT", str(self.port)))
        if request.path == "/slow":
            await asyncio.sleep(3 * FETCH_TIMEOUT_S)
        bodies = {"/reuse.png": png("reuse"), "/big": bytes(2 * MAX_IMAGE_BYTES)}
        return web.Response(body=bodies.get(request.path, png("ok")), content_type="image/png")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{path:.*}", self.handle)
        return app


@pytest.fixture(scope="module")
def media_server() -> Iterator[MediaServer]:
    """The media host on its own thread and loop, so it answers while a test blocks."""
    server = MediaServer()
    with local_media_host(server.app()) as port:
        server.port = port
        yield server


# ---- the app -----------------------------------------------------------------------------


@dataclass
class Graph:
    """The deployed app, its media host, and what counts prompt tokens offline."""

    url: str
    media: MediaServer
    arch: ModelArchitecture
    tokenizer: Tokenizer

    def post(self, body: Body) -> tuple[httpx.Response, float]:
        """POST /v1/chat/completions; the response and its wall time in seconds."""
        start = time.perf_counter()
        response = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
        return response, time.perf_counter() - start

    def answer(self, body: Body) -> str:
        response, _ = self.post(body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    def stats(self, deployment: str) -> dict[str, Any]:
        handle = serve.get_deployment_handle(deployment, app_name=APP)
        return handle.stats.remote().result(timeout_s=TIMEOUT_S)

    def vision_counts(self) -> tuple[int, int]:
        """(tiles the VisionEncoder has encoded, its embedding-cache hits)."""
        stats = self.stats("VisionEncoder")
        return stats["encoded_tiles"], stats["cache_hits"]

    def prompt_tokens(self, question: str, tiles: list[int]) -> int:
        """Token count of chat()'s prompt for `question` with images of `tiles` tiles each."""
        query = build_query(get_template(self.arch.template), question)
        query = expand_image_placeholders(query, tiles, self.arch.num_image_token)
        return len(self.tokenizer.encode(query))


@pytest.fixture(scope="module")
def graph(tiny_qwen2: Path, media_server: MediaServer) -> Iterator[Graph]:
    limits = MediaLimits(
        trusted_networks=("127.0.0.1/32",),  # the media host, for this app only
        fetch_timeout_s=FETCH_TIMEOUT_S,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_images_per_request=MAX_IMAGES,
        max_tiles_per_request=MAX_TILES,
    )
    args = tiny_serve_args(
        tiny_qwen2,
        served_model_name=MODEL,
        engine=EngineConfig(max_model_len=MAX_MODEL_LEN, num_kv_blocks=512, max_num_seqs=32),
        media=limits,
        default_sampling=SamplingParams(max_tokens=MAX_NEW),
    )
    arch, tokenizer = ModelArchitecture.from_checkpoint(tiny_qwen2), load_tokenizer(tiny_qwen2)
    with serve_cluster(num_cpus=8, num_gpus=2) as url, deployed_app(args, APP):
        yield Graph(url, media_server, arch, tokenizer)


@pytest.fixture(scope="module")
def offline(tiny_qwen2: Path) -> InternVLChat:
    return InternVLChat.from_pretrained(tiny_qwen2, dtype="float32")


def assert_error(response: httpx.Response, status: int, kind: str, fragment: str) -> Body:
    """An OpenAI error body with this status and type whose message holds `fragment`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and (error["type"], error["code"]) == (kind, kind)
    assert fragment in error["message"], error["message"]
    return error


# ---- 1. embedding reuse ------------------------------------------------------------------


def test_same_image_in_two_requests_is_encoded_once(graph: Graph, offline: InternVLChat) -> None:
    """By data: URL, then the same bytes from the media host: the cache keys on content."""
    pixels = offline.load_image(png("reuse"))  # [tiles, 3, S, S]
    before = graph.vision_counts()
    first = graph.answer(chat_body(image(mf.data_url(png("reuse"))), "Describe."))
    middle = graph.vision_counts()
    second = graph.answer(chat_body(image(graph.media.url("/reuse.png")), "Describe."))
    assert middle == (before[0] + pixels.shape[0], before[1])
    assert graph.vision_counts() == (middle[0], middle[1] + 1)  # a cache hit, no tile encoded
    assert second == first and first.strip() == offline.chat(pixels, "Describe.", GEN)


def test_same_image_twice_in_one_request_is_encoded_once(
    graph: Graph, offline: InternVLChat
) -> None:
    data = mf.png_bytes(168, 112, seed=22)
    pixels = offline.load_image(data)  # [tiles, 3, S, S]
    body = chat_body(image(mf.data_url(data)), image(mf.data_url(data)), "Compare.")
    before = graph.vision_counts()
    first = graph.answer(body)
    middle = graph.vision_counts()
    assert middle == (before[0] + pixels.shape[0], before[1])  # once, not twice
    assert graph.answer(body) == first
    assert graph.vision_counts() == (middle[0], middle[1] + 2)
    both, n = torch.cat([pixels, pixels]), pixels.shape[0]  # [2 * tiles, 3, S, S]
    question = "Image-1: <image>\nImage-2: <image>\nCompare."
    assert first.strip() == offline.chat(both, question, GEN, num_patches_list=[n, n])


# ---- 2. tile and token budgets -----------------------------------------------------------

# (request fields, [(image, its part's extra fields, the max_num it must be tiled with)])
# fmt: off
TILE_CASES = {
    "all-low": ({}, [("wide", {"detail": "low"}, 1), ("ok", {"detail": "low"}, 1)]),
    "per-image": ({}, [("wide", {"max_dynamic_patch": 2}, 2),
                       ("ok", {"detail": "high"}, 12)]),  # high: the checkpoint's max, 12
    "per-request": ({"max_dynamic_patch": 4}, [("wide", {}, 4),
                                               ("wide", {"max_dynamic_patch": 2}, 2)]),
}
# fmt: on


@pytest.mark.parametrize("name", list(TILE_CASES))
def test_tiles_per_image_set_prompt_tokens(graph: Graph, offline: InternVLChat, name: str) -> None:
    """usage.prompt_tokens = text tokens + num_image_token (4) per tile, tiles as chat()'s."""
    fields, images = TILE_CASES[name]
    parts = [image(mf.data_url(png(key)), **extra) for key, extra, _ in images]
    response, _ = graph.post(chat_body(*parts, "Compare.", max_tokens=1, **fields))
    assert response.status_code == 200, response.text
    tiles = [offline.load_image(png(key), max_num=m).shape[0] for key, _, m in images]
    question = "Image-1: <image>\nImage-2: <image>\nCompare."
    text_tokens = graph.prompt_tokens(question, [0, 0])  # `<img></img>` with no tile inside
    expected = text_tokens + graph.arch.num_image_token * sum(tiles)
    assert response.json()["usage"]["prompt_tokens"] == expected
    assert expected == graph.prompt_tokens(question, tiles)


def test_tile_budget_refused(graph: Graph) -> None:
    parts = [image(mf.data_url(mf.png_bytes(168, 112, seed=40 + k))) for k in range(3)]
    response, _ = graph.post(chat_body(*parts, "Compare."))  # 3 x 7 tiles > 16
    error = assert_error(response, 400, "invalid_request_error", "max_tiles_per_request is 16")
    assert "21 image tiles" in error["message"] and "detail=low" in error["message"]
    assert error["param"] == "max_dynamic_patch"
    assert graph.answer(chat_body(*parts, "Compare.", max_dynamic_patch=2))  # 3 x 3 tiles


def test_multimodal_prompt_over_max_model_len_refused(graph: Graph) -> None:
    """A text that fits alone; with two 7-tile images it does not, and the 400 says how many
    tokens the request needed, the limit and the knob that reduces it."""
    words = 1
    while graph.prompt_tokens("go " * (words + 1), []) + MAX_NEW <= MAX_MODEL_LEN:
        words += 1
    text = "go " * words
    assert graph.answer(chat_body(text, max_tokens=MAX_NEW)) is not None
    pictures = [image(mf.data_url(mf.png_bytes(168, 112, seed=50 + k))) for k in range(2)]
    response, _ = graph.post(chat_body(*pictures, text, max_tokens=MAX_NEW))
    needed = graph.prompt_tokens("Image-1: <image>\nImage-2: <image>\n" + text, [7, 7])
    error = assert_error(response, 400, "context_length_exceeded", f"prompt has {needed} tokens")
    assert f"max_model_len {MAX_MODEL_LEN}" in error["message"]
    assert "56 of them image tokens from 14 tiles" in error["message"]
    assert "max_dynamic_patch" in error["message"] and error["param"] == "messages"


# ---- 3. hostile inputs -------------------------------------------------------------------


def _url(url: str) -> Callable[[MediaServer], list[Body]]:
    """One image part; HOST is the trusted media host, PORT its port."""
    return lambda m: [image(url.replace("HOST", m.url("")).replace("PORT", str(m.port)))]


def _data(make: Callable[[], bytes], mime: str = "image/png") -> Callable[[Any], list[Body]]:
    return lambda _: [image(mf.data_url(make(), mime))]


BLOCKED, MEDIA, TOO_LARGE = "blocked", "invalid_media", "payload_too_large"
BYTES, URL = f"max_image_bytes limit is {MAX_IMAGE_BYTES}", f"{PART0}.image_url.url"
TEN_HOURS = "video lasts 36001 s; max_video_duration_s is 3600"
THOUSAND = "request has 1000 images and video frames; max_images_per_request is 8"
Hostile = tuple[Callable[[MediaServer], list[Body]], int, str, str, str, int]
# name: (parts, status, error type, message fragment, param, requests the media host may see)
# fmt: off
HOSTILE: dict[str, Hostile] = {
    "private-10": (_url("http://10.0.0.1/x.png"), 400, MEDIA, BLOCKED, URL, 0),
    "private-192": (_url("http://192.168.1.1/x.png"), 400, MEDIA, BLOCKED, URL, 0),
    "loopback-untrusted": (_url("http://127.0.0.2:PORT/ok.png"), 400, MEDIA, BLOCKED, URL, 0),
    "loopback-v6": (_url("http://[::1]:PORT/ok.png"), 400, MEDIA, BLOCKED, URL, 0),
    "metadata": (_url(METADATA), 400, MEDIA, BLOCKED, URL, 0),
    "metadata-v6": (_url("http://[fd00:ec2::254]/latest/"), 400, MEDIA, BLOCKED, URL, 0),
    "redirect-to-loopback": (_url("HOST/redirect?to=http://127.0.0.2:PORT/ok.png"), 400, MEDIA,
                             BLOCKED, URL, 1),
    "redirect-to-metadata": (_url(f"HOST/redirect?to={METADATA}"), 400, MEDIA, BLOCKED, URL, 1),
    "oversized": (_url("HOST/big"), 413, TOO_LARGE, BYTES, URL, 1),
    "slow-server": (_url("HOST/slow"), 400, MEDIA, "fetch_timeout_s", URL, 1),
    "png-bomb-30000": (_data(mf.png_bomb), 413, TOO_LARGE, "max_image_pixels", URL, 0),
    "truncated-jpeg": (_data(lambda: mf.truncated(mf.jpeg_bytes(200, 150)), "image/jpeg"), 400,
                       MEDIA, "truncated", URL, 0),
    "zip-as-png": (_data(mf.zip_bytes), 400, MEDIA, "could not be decoded", URL, 0),
    "thousand-images": (lambda m: [image(m.url(f"/ok.png?i={k}")) for k in range(1000)], 400,
                        "invalid_request_error", THOUSAND, "messages", 0),  # before any fetch
    "ten-hour-video": (lambda _: [{"type": "video_url", "video_url": {"url": mf.data_url(
                           mf.mp4_clip(11, frame_gap_s=3600), "video/mp4")}}], 413, TOO_LARGE,
                       TEN_HOURS, f"{PART0}.video_url.url", 0),
    "invalid-base64": (_url("data:image/png;base64,@@"), 400, MEDIA, "invalid base64", URL, 0),
    "typed-img-context": (lambda _: [image(mf.data_url(png("ok"))), {"type": "text", "text":
                          "<IMG_CONTEXT>"}], 400, "invalid_request_error", "reserved token",
                          "messages", 0),  # would shift the image rows; refused before vision
}
# fmt: on


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_refused_then_normal_request_served(graph: Graph, name: str) -> None:
    """The refusal within 3 s (a timeout within fetch_timeout_s + 3 s, not before it), the media
    host reached `fetches` times and never on 127.0.0.2, no tile encoded; then a normal request."""
    parts, status, kind, fragment, param, fetches = HOSTILE[name]
    hits, (encoded, _) = sum(graph.media.hits.values()), graph.vision_counts()
    response, elapsed = graph.post(chat_body(*parts(graph.media), "Describe."))
    logger.info("%s: HTTP %d in %.1f ms", name, response.status_code, elapsed * 1e3)
    assert assert_error(response, status, kind, fragment)["param"] == param
    timeout = FETCH_TIMEOUT_S if name == "slow-server" else 0.0
    assert 0.9 * timeout <= elapsed < timeout + 3.0, f"refused after {elapsed:.2f} s"
    assert sum(graph.media.hits.values()) - hits == fetches
    assert graph.media.hits["127.0.0.2/ok.png"] == 0
    assert graph.vision_counts()[0] == encoded  # refused before any vision work
    normal, _ = graph.post(chat_body(image(graph.media.url("/ok.png")), "Hi.", max_tokens=2))
    assert normal.json()["choices"][0]["finish_reason"] in ("stop", "length"), normal.text


def assert_nothing_left_running(graph: Graph) -> None:
    """Every KV block free, no sequence running or waiting, every stage healthy."""

    def idle() -> bool:
        stats = graph.stats("LLM")
        busy = stats["num_running"] or stats["num_waiting"]
        return not busy and stats["kv_blocks_free"] == stats["kv_blocks_total"]

    assert wait_until(idle, timeout_s=5.0), graph.stats("LLM")
    health = httpx.get(f"{graph.url}/health", timeout=TIMEOUT_S)
    assert (health.status_code, health.json()["status"]) == (200, "ok"), health.text


def test_nothing_left_running_after_hostile_inputs(graph: Graph) -> None:
    assert_nothing_left_running(graph)


# ---- 4. property test: generated request bodies over HTTP ----------------------------------

NUM_BODIES, CONCURRENCY = 1000, 16


def response_problem(response: httpx.Response) -> str | None:
    """What is wrong with a response, or None: a 5xx, a non-OpenAI error body, a 200 stream
    with an error event or no [DONE], or more tokens than max_tokens allows."""
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
    payload = response.json()
    too_long = payload["usage"]["completion_tokens"] > MAX_NEW * len(payload["choices"])
    return f"over max_tokens: {payload['usage']}" if too_long else None


async def fire(url: str, bodies: list[bytes]) -> list[tuple[str, str | None]]:
    """POST every body, CONCURRENCY at a time; per body its status with the error type or the
    content type ('timeout' for a hang) and the problem found, if any."""
    gate, headers = asyncio.Semaphore(CONCURRENCY), {"content-type": "application/json"}
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:

        async def send(body: bytes) -> tuple[str, str | None]:
            async with gate:
                try:
                    async with asyncio.timeout(TIMEOUT_S):
                        response = await client.post(url, content=body, headers=headers)
                except (TimeoutError, httpx.TimeoutException):
                    return "timeout", f"no answer in {TIMEOUT_S} s <- {body[:200]!r}"
            problem = response_problem(response)
            if problem is not None:
                return f"{response.status_code} ?", f"{problem} <- {body[:300]!r}"
            ok = response.status_code == 200
            kind = response.headers["content-type"] if ok else response.json()["error"]["type"]
            return f"{response.status_code} {kind.split(';')[0]}", None

        return await asyncio.gather(*(send(body) for body in bodies))


def test_generated_bodies_never_get_5xx_or_hang(graph: Graph) -> None:
    bodies = collect_bodies(graph.media.url(""), NUM_BODIES)
    assert len(bodies) >= NUM_BODIES
    start = time.perf_counter()
    results = asyncio.run(fire(f"{graph.url}/v1/chat/completions", bodies))
    counts = Counter(key for key, _ in results)
    logger.info("%d bodies in %.1f s: %s", len(bodies), time.perf_counter() - start, counts)
    problems = [problem for _, problem in results if problem is not None]
    assert not problems, f"{len(problems)} problems, e.g. {problems[:5]}"
    by_status = Counter(key.split()[0] for key in counts.elements())
    assert by_status["200"] >= len(bodies) // 3 and counts["200 text/event-stream"]
    assert all(by_status[s] for s in ("400", "404", "413", "422")), by_status
    assert_nothing_left_running(graph)
