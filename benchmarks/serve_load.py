"""The load `benchmarks/serve.py` sends: text-only, image and video chat bodies, and the bounded
HTTP client that streams them and times every request.

In: how many requests, the image and video shares, max_tokens. Out: OpenAI chat request bodies
(data: URLs: random-noise PNGs of random sizes, short H.264 clips of distinct frames), seeded,
so every run and every path sends the same load; per request a `RequestRecord`.
"""

from __future__ import annotations

import asyncio
import base64
import fractions
import io
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import av
import numpy as np
from PIL import Image
from serving_metrics import RequestRecord, StreamTimer, request_kind

VIDEO_FPS = 4


def _png_url(rng: np.random.Generator) -> str:
    width, height = int(rng.integers(60, 400)), int(rng.integers(60, 400))
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)  # [H, W, 3]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _mp4_url(rng: np.random.Generator, num_frames: int) -> str:
    """An H.264 clip of `num_frames` flat frames of random colours at VIDEO_FPS."""
    width, height = 96, 64  # even sides: yuv420p
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, VIDEO_FPS)
        for index in range(num_frames):
            pixels = np.empty((height, width, 3), dtype=np.uint8)  # [H, W, 3]
            pixels[:] = rng.integers(0, 256, 3, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


def request_bodies(
    model: str,
    num: int,
    *,
    image_share: float,
    video_share: float = 0.0,
    max_tokens: int,
    ignore_eos: bool = False,
    num_segments: int = 4,
) -> list[dict[str, Any]]:
    """`num` bodies: a `video_share` of them carry a clip (`num_segments` frames sampled),
    an `image_share` an image, the rest text only; kinds interleave at random (seed 0)."""
    if image_share + video_share > 1:
        raise ValueError(f"image_share + video_share is {image_share + video_share} > 1")
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(num):
        text = f"Request {i}: tell me about item {rng.integers(1000)} and {rng.integers(1000)}."
        content: list[dict[str, Any]] | str = text
        draw = rng.random()
        if draw < video_share:
            video = {"url": _mp4_url(rng, 2 * num_segments), "num_segments": num_segments}
            content = [{"type": "video_url", "video_url": video}, {"type": "text", "text": text}]
        elif draw < video_share + image_share:
            image = {"url": _png_url(rng)}
            content = [{"type": "image_url", "image_url": image}, {"type": "text", "text": text}]
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        }
        if ignore_eos:
            body["ignore_eos"] = True
        bodies.append(body)
    return bodies


async def run_bounded(
    bodies: list[dict[str, Any]],
    concurrency: int,
    one: Callable[[dict[str, Any]], Awaitable[float]],
) -> tuple[float, list[float], int]:
    """Every body through `one` (returns the TTFT), at most `concurrency` at a time: the wall
    time, the TTFTs of the successes and the number of failures."""
    semaphore = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    errors = 0

    async def run(body: dict[str, Any]) -> None:
        nonlocal errors
        async with semaphore:
            try:
                ttfts.append(await one(body))
            except Exception:  # counted, not raised: the benchmark reports errors
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(run(b) for b in bodies))
    return time.perf_counter() - start, ttfts, errors


async def stream_load(
    bodies: list[dict[str, Any]],
    concurrency: int,
    url: str,
    chunks: list[int] | None = None,
    prefix: str = "",
    records: list[RequestRecord] | None = None,
) -> tuple[float, list[float], int]:
    """The load through HTTP, streamed with usage. aiohttp, not httpx: the client shares the 2
    cores with the server here, and aiohttp spends about half of httpx's CPU per streamed
    request. `chunks` collects each request's number of SSE chunks with choices (the role
    chunk included); `records` each request's timings (serving_metrics.StreamTimer)."""
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:

        async def one(body: dict[str, Any]) -> float:
            payload = json.dumps(
                {**body, "stream": True, "stream_options": {"include_usage": True}}
            )
            timer = StreamTimer(request_kind(body), time.perf_counter())
            try:
                async with client.post(
                    f"{prefix}/v1/chat/completions", data=payload, headers=headers
                ) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}")
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            timer.on_payload(json.loads(line[6:]), time.perf_counter())
                record = timer.finish()
            except Exception as e:
                record = timer.fail(repr(e))
            if records is not None:
                records.append(record)
            if not record.success:
                raise RuntimeError(record.error)
            if chunks is not None:
                chunks.append(len(record.itl_s) + 1)
            return record.ttft_s

        return await run_bounded(bodies, concurrency, one)
