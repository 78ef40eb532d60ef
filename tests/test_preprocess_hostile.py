"""Hostile inputs at the RequestPreparer level: each is refused with its error class, fast, naming
the limit, with no task or thread left behind, and the same preparer serves a normal request next.

Media come from `media_factory`; URLs point at a local aiohttp server (127.0.0.1 and 127.0.0.2,
own thread and loop) that counts hits, so "refused before any fetch" is checked, not assumed.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams
from internvl_core.errors import (
    ContextLengthError,
    InternVLError,
    InvalidRequestError,
    MediaError,
    PayloadTooLargeError,
)
from internvl_core.preprocess.image import TilingConfig, image_to_pixels, load_image
from internvl_core.preprocess.prompt import build_query, expand_image_placeholders, get_template
from internvl_core.preprocess.request import PreparedRequest, RequestPreparer
from internvl_core.preprocess.video import load_video
from internvl_core.protocol import ChatCompletionRequest
from internvl_core.serve_args import MediaLimits
from internvl_core.tokenizer import Tokenizer, load_tokenizer
from tests import media_factory as mf
from tests.local_media_host import local_media_host

logger = logging.getLogger(__name__)

Body = dict[str, Any]
OK_PNG = mf.png_bytes(120, 60, seed=1)
BIG_BYTES = 200_000
MAX_IMAGE_BYTES = 50_000
TRUSTED = ("127.0.0.1/32",)


@dataclass
class MediaServer:
    """A local media host on 127.0.0.1 and 127.0.0.2 (same port); hits keyed 'ip/path'."""

    port: int = 0
    hits: Counter[str] = field(default_factory=Counter)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _routes(server: MediaServer) -> dict[str, Callable[[web.Request], Awaitable[Any]]]:
    gzip_bomb = gzip.compress(bytes(20_000_000), compresslevel=9)  # about 20 kB -> 20 MB

    async def ok_png(_: web.Request) -> web.Response:
        return web.Response(body=OK_PNG, content_type="image/png")

    async def clip(_: web.Request) -> web.Response:
        return web.Response(body=mf.mp4_clip(), content_type="video/mp4")

    async def big_length(_: web.Request) -> web.Response:
        return web.Response(body=bytes(BIG_BYTES), content_type="image/png")

    async def big_chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(BIG_BYTES // 10_000):
            await resp.write(bytes(10_000))
        return resp

    async def bomb(_: web.Request) -> web.Response:
        headers = {"Content-Encoding": "gzip", "Content-Type": "image/png"}
        return web.Response(body=gzip_bomb, headers=headers)

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(3.0)
        return web.Response(body=OK_PNG, content_type="image/png")

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(20):  # one byte per 0.2 s: never idle long enough for sock_read
            await resp.write(b"\0")
            await asyncio.sleep(0.2)
        return resp

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"].replace("PORT", str(server.port)))

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.path)

    return {
        "/ok.png": ok_png,
        "/clip.mp4": clip,
        "/big-length": big_length,
        "/big-chunked": big_chunked,
        "/gzip-bomb": bomb,
        "/slow": slow,
        "/trickle": trickle,
        "/redirect": redirect,
        "/loop": loop,
    }


def _app(server: MediaServer) -> web.Application:
    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        local_ip = request.transport.get_extra_info("sockname")[0]  # type: ignore[union-attr]
        server.hits[f"{local_ip}{request.path}"] += 1
        return await handler(request)

    app = web.Application(middlewares=[count])
    for path, handler in _routes(server).items():
        app.router.add_get(path, handler)
    return app


@pytest.fixture(scope="module")
def media_server() -> Iterator[MediaServer]:
    server = MediaServer()
    with local_media_host(_app(server)) as port:
        server.port = port
        yield server


@dataclass
class Model:
    arch: ModelArchitecture
    tokenizer: Tokenizer


@pytest.fixture(scope="module")
def model(tiny_qwen2: Path) -> Model:
    return Model(ModelArchitecture.from_checkpoint(tiny_qwen2), load_tokenizer(tiny_qwen2))


def _preparer(model: Model, **limits: Any) -> RequestPreparer:
    return RequestPreparer(
        model.arch,
        model.tokenizer,
        MediaLimits.model_validate({"fetch_timeout_s": 1.0, **limits}),
        EngineConfig(max_model_len=4096),
        SamplingParams(max_tokens=16),
    )


def _image(url: str, **extra: Any) -> Body:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def _video(url: str, **extra: Any) -> Body:
    return {"type": "video_url", "video_url": {"url": url, **extra}}


def _request(*parts: Body, text: str = "Describe.", **fields: Any) -> ChatCompletionRequest:
    content = [*parts, {"type": "text", "text": text}]
    body = {"model": "m", "messages": [{"role": "user", "content": content}], **fields}
    return ChatCompletionRequest.model_validate(body)


async def _no_tasks_left() -> None:
    """Only the calling task runs: every fetch/decode of the refused request is gone."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    for _ in range(20):  # aiohttp may need a loop turn or two to drop a closed connection
        others = {task for task in others if not task.done()}
        if not others:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"tasks left running after a refusal: {others}")


def _threads() -> list[str]:
    """Live threads but the process-wide thumbnail resize pool, which lives on by design."""
    return [t.name for t in threading.enumerate() if not t.name.startswith("thumbnail")]


def _wait_for_threads(baseline: int) -> None:
    deadline = time.monotonic() + 2.0
    while len(_threads()) > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_threads()) <= baseline, _threads()


def _refused(
    preparer: RequestPreparer,
    request: ChatCompletionRequest,
    *,
    error: type[InternVLError],
    match: str,
    max_s: float = 2.0,
    follow_up: ChatCompletionRequest | None = None,
) -> tuple[InternVLError, float]:
    """Refusal of `request`, its time, then a normal request on the same preparer; no leaks."""
    baseline = len(_threads())
    follow_up = follow_up or _request(_image(mf.data_url(OK_PNG)))

    async def scenario() -> tuple[InternVLError, float, PreparedRequest]:
        start = time.perf_counter()
        with pytest.raises(error, match=match) as info:
            await asyncio.wait_for(preparer.prepare(request, "hostile"), timeout=max_s + 5)
        elapsed = time.perf_counter() - start
        await _no_tasks_left()
        prepared = await asyncio.wait_for(preparer.prepare(follow_up, "normal"), timeout=10)
        await asyncio.wait_for(preparer.fetcher.close(), timeout=2)
        return info.value, elapsed, prepared

    refusal, elapsed, prepared = asyncio.run(scenario())
    _wait_for_threads(baseline)
    assert elapsed < max_s, f"refused after {elapsed:.2f} s; bound is {max_s} s"
    assert isinstance(refusal, error) and refusal.status_code in (400, 413)
    assert prepared.num_tiles >= 1 and prepared.prompt_token_ids
    return refusal, elapsed


# ---- addresses: SSRF ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:PORT/ok.png",
        "http://localhost:PORT/ok.png",
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://[::1]:PORT/ok.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]:PORT/ok.png",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://100.64.0.1/x.png",
        "http://0.0.0.0:PORT/ok.png",
        "http://0x7f000001:PORT/ok.png",
        "http://2130706433:PORT/ok.png",
    ],
)
def test_private_address_refused_without_connecting(
    model: Model, media_server: MediaServer, url: str
) -> None:
    before = sum(media_server.hits.values())
    request = _request(_image(url.replace("PORT", str(media_server.port))))
    refusal, _ = _refused(_preparer(model), request, error=MediaError, match="blocked|canonical")
    assert refusal.status_code == 400
    assert sum(media_server.hits.values()) == before


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("http://127.0.0.2:PORT/ok.png", "blocked"),
        ("http://169.254.169.254/latest/meta-data/", "blocked"),
        ("http://[::1]:PORT/ok.png", "blocked"),
        ("file:///etc/passwd", "not an http"),
    ],
)
def test_redirect_from_trusted_to_private_refused(
    model: Model, media_server: MediaServer, target: str, match: str
) -> None:
    preparer = _preparer(model, trusted_networks=TRUSTED)
    request = _request(_image(media_server.url(f"/redirect?to={target}")))
    follow_up = _request(_image(media_server.url("/ok.png")))  # the same session still works
    _refused(preparer, request, error=MediaError, match=match, follow_up=follow_up)
    assert media_server.hits["127.0.0.2/ok.png"] == 0


def test_redirect_loop_refused(model: Model, media_server: MediaServer) -> None:
    request = _request(_image(media_server.url("/loop")))
    preparer = _preparer(model, trusted_networks=TRUSTED)
    _refused(preparer, request, error=MediaError, match="redirected more than 5 times")


# ---- sizes and time -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/big-length", "/big-chunked", "/gzip-bomb", "data:"])
def test_oversized_download_refused(model: Model, media_server: MediaServer, path: str) -> None:
    preparer = _preparer(model, trusted_networks=TRUSTED, max_image_bytes=MAX_IMAGE_BYTES)
    url = mf.data_url(bytes(BIG_BYTES)) if path == "data:" else media_server.url(path)
    request = _request(_image(url))
    refusal, _ = _refused(preparer, request, error=PayloadTooLargeError, match=f"{MAX_IMAGE_BYTES}")
    assert refusal.status_code == 413


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_slow_server_times_out(model: Model, media_server: MediaServer, path: str) -> None:
    preparer = _preparer(model, trusted_networks=TRUSTED, fetch_timeout_s=1.0)
    request = _request(_image(media_server.url(path)))
    _, elapsed = _refused(preparer, request, error=MediaError, match="fetch_timeout_s", max_s=2.0)
    assert elapsed >= 0.9


def test_failure_cancels_the_other_fetches(model: Model, media_server: MediaServer) -> None:
    """A refused image ends the request at once: the slow sibling fetch is cancelled."""
    preparer = _preparer(model, trusted_networks=TRUSTED, fetch_timeout_s=5.0)
    request = _request(_image(media_server.url("/slow")), _image("ftp://example.com/x.png"))
    _refused(preparer, request, error=MediaError, match="scheme", max_s=1.0)


@pytest.mark.parametrize(
    ("bomb", "limits"),
    [
        (mf.png_bomb(30000, 30000), {}),  # valid file, 900 MP; PIL's own guard fires first
        (mf.png_bomb(30000, 30000, complete=False), {"max_image_pixels": 10**10}),
        (mf.png_bomb(8000, 8000, complete=False), {}),  # 64 MP: only max_image_pixels stops it
    ],
    ids=["complete-30000", "truncated-30000-high-limit", "truncated-8000"],
)
def test_png_bomb_refused_from_header(model: Model, bomb: bytes, limits: dict[str, Any]) -> None:
    request = _request(_image(mf.data_url(bomb)))
    refusal, elapsed = _refused(
        _preparer(model, **limits), request, error=PayloadTooLargeError, match="max_image_pixels"
    )
    logger.info("PNG bomb of %d bytes refused in %.1f ms", len(bomb), elapsed * 1e3)
    assert refusal.status_code == 413
    assert elapsed < 0.5


def test_thousand_images_refused_before_any_fetch(model: Model, media_server: MediaServer) -> None:
    parts = [_image(media_server.url(f"/ok.png?i={k}")) for k in range(1000)]
    request = _request(*parts)
    preparer = _preparer(model, trusted_networks=TRUSTED)
    before = media_server.hits["127.0.0.1/ok.png"]
    _, elapsed = _refused(
        preparer, request, error=InvalidRequestError, match="max_images_per_request is 16"
    )
    assert elapsed < 0.5
    assert media_server.hits["127.0.0.1/ok.png"] == before


def test_context_length_refused(model: Model) -> None:
    request = _request(text="many words " * 20_000)
    _refused(_preparer(model), request, error=ContextLengthError, match="max_model_len 4096")


# ---- decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (mf.truncated(mf.jpeg_bytes(200, 150)), "truncated"),
        (mf.zip_bytes(), "could not be decoded"),
        (mf.truncated(OK_PNG, 0.3), "could not be decoded|cannot be decoded"),
        (b"", "could not be decoded"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "could not be decoded"),
    ],
    ids=["truncated-jpeg", "zip-as-png", "truncated-png", "empty", "bad-ihdr"],
)
def test_undecodable_image_refused(model: Model, data: bytes, match: str) -> None:
    request = _request(_image(mf.data_url(data)))
    _refused(_preparer(model), request, error=MediaError, match=match)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX", "SGI", "QOI", "ICNS"])
def test_format_not_allowed_names_format(model: Model, fmt: str) -> None:
    data = mf.solid_image(32, 32, (10, 20, 30), fmt=fmt)
    request = _request(_image(mf.data_url(data)))
    _refused(
        _preparer(model), request, error=MediaError, match=f"image format {fmt} is not allowed"
    )


def test_gif_animation_uses_first_frame(model: Model) -> None:
    colors = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    request = _request(_image(mf.data_url(mf.gif_animation(colors), "image/gif")))
    prepared = asyncio.run(_preparer(model).prepare(request, "gif"))
    tiling = TilingConfig.from_architecture(model.arch)
    first = image_to_pixels(Image.fromarray(mf.gif_frame(colors[0])), tiling)  # [n, 3, S, S]
    second = image_to_pixels(Image.fromarray(mf.gif_frame(colors[1])), tiling)
    np.testing.assert_array_equal(prepared.images[0].pixel_values, first)
    assert not np.array_equal(prepared.images[0].pixel_values, second)


# ---- video --------------------------------------------------------------------------------


def test_ten_hour_video_refused(model: Model) -> None:
    clip = mf.mp4_clip(11, frame_gap_s=3600)
    request = _request(_video(mf.data_url(clip, "video/mp4"), num_segments=4))
    refusal, _ = _refused(
        _preparer(model), request, error=PayloadTooLargeError, match="max_video_duration_s is 3600"
    )
    assert "36001 s" in refusal.message


@pytest.mark.parametrize(
    "data",
    [
        b"\0" * 1000,
        mf.truncated(mf.mp4_clip(), 0.5),
        mf.corrupted(mf.mp4_clip(), seed=0, start=40),
        OK_PNG[:100],
    ],
    ids=["zeros", "truncated", "corrupted", "png-bytes"],
)
def test_corrupt_video_refused(model: Model, data: bytes) -> None:
    request = _request(_video(mf.data_url(data, "video/mp4"), num_segments=2))
    _refused(_preparer(model), request, error=MediaError, match="video")


def test_num_segments_over_cap_refused_before_fetch(
    model: Model, media_server: MediaServer
) -> None:
    preparer = _preparer(
        model, trusted_networks=TRUSTED, max_num_segments=4, max_images_per_request=64
    )
    request = _request(_video(media_server.url("/clip.mp4"), num_segments=8))
    _refused(preparer, request, error=InvalidRequestError, match="max_num_segments is 4")
    assert media_server.hits["127.0.0.1/clip.mp4"] == 0


def test_video_prompt_and_pixels_equal_offline_chat(model: Model) -> None:
    clip = mf.mp4_clip()
    request = _request(_video(mf.data_url(clip, "video/mp4"), num_segments=4), text="What moves?")
    prepared = asyncio.run(_preparer(model).prepare(request, "video"))
    tiling = TilingConfig(image_size=model.arch.force_image_size, max_num=1, use_thumbnail=True)
    pixels, num_patches = load_video(clip, cfg=tiling, num_segments=4)  # [4, 3, S, S]
    question = "".join(f"Frame{k + 1}: <image>\n" for k in range(4)) + "What moves?"
    query = build_query(get_template(model.arch.template), question)
    query = expand_image_placeholders(query, num_patches, model.arch.num_image_token)
    assert prepared.prompt_token_ids == model.tokenizer.encode(query)
    got = np.concatenate([image.pixel_values for image in prepared.images])  # [4, 3, S, S]
    np.testing.assert_array_equal(got, pixels)
    assert [image.num_tiles for image in prepared.images] == num_patches == [1, 1, 1, 1]


# ---- URLs and local files -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("data:image/png;base64,@@not*base64@@", "invalid base64"),
        ("data:image/png;base64,iVBORw0KGgo", "invalid base64"),
        ("data:image/png;base64", "no ','"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://example.com/a.png", "scheme 'ftp'"),
        ("gopher://127.0.0.1:70/_GET", "scheme 'gopher'"),
        ("/etc/passwd", "scheme 'path'"),
        ("../../etc/passwd", "scheme 'path'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
    ],
)
def test_bad_url_refused(model: Model, url: str, match: str) -> None:
    _refused(_preparer(model), _request(_image(url)), error=MediaError, match=match)


def test_local_media_dir_allows_inside_refuses_escapes(model: Model, tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    (root / "ok.png").write_bytes(OK_PNG)
    (tmp_path / "secret.png").write_bytes(OK_PNG)
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    inside = _request(_image(str(root / "ok.png")))
    escapes = [
        str(root / ".." / "secret.png"),
        f"file://{root}/../secret.png",
        str(root / "link.png"),
        str(tmp_path / "secret.png"),
    ]
    for url in escapes:
        preparer = _preparer(model, local_media_dir=str(root))
        _refused(preparer, _request(_image(url)), error=MediaError, match="allow-listed")
    prepared = asyncio.run(_preparer(model, local_media_dir=str(root)).prepare(inside, "local"))
    tiling = TilingConfig.from_architecture(model.arch)
    np.testing.assert_array_equal(prepared.images[0].pixel_values, load_image(OK_PNG, tiling))
