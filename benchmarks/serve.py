"""Serve graph vs the same stages in one process: a bounded mixed text/image load on the tiny model.

Runs N requests at a fixed concurrency (a) through the Ray Serve graph over HTTP (streaming, to
time the first token) and (b) through the same preprocess + vision + engine code in-process, then
prints one JSON line: graph_req_s, inproc_req_s, ratio, ttft_p50_ms, ttft_p99_ms, errors, device.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml
from PIL import Image


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bodies(model: str, num: int, image_share: float, max_tokens: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(num):
        text = f"Request {i}: tell me about item {rng.integers(1000)} and {rng.integers(1000)}."
        content: list[dict[str, Any]] | str = text
        if rng.random() < image_share:
            width, height = int(rng.integers(60, 400)), int(rng.integers(60, 400))
            pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            content = [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ]
        messages = [{"role": "user", "content": content}]
        bodies.append({"model": model, "messages": messages, "max_tokens": max_tokens})
    return bodies


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of every process on this machine, by process title
    (Ray names its workers `ray::ServeReplica:app:Deployment`, `ray::ProxyActor`, ...)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(pid) == os.getpid():
            name = "client+driver"
        elif title.startswith("ray::"):
            name = title.removeprefix("ray::ServeReplica:").split(".")[0]  # drop the method
        else:
            name = title.rsplit("/", 1)[-1] or "?"
        out[f"{name}#{pid}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _core_ms_per_request(before: dict[str, float], after: dict[str, float], n: int) -> dict:
    """Core-milliseconds per request by process name (summed over pids), largest first."""
    spent: dict[str, float] = {}
    for key, seconds in after.items():
        name = key.rsplit("#", 1)[0]
        spent[name] = spent.get(name, 0.0) + seconds - before.get(key, 0.0)
    rows = {k: round(v * 1e3 / n, 2) for k, v in spent.items() if v * 1e3 / n >= 0.1}
    rows = dict(sorted(rows.items(), key=lambda kv: -kv[1]))
    return {"total": round(sum(rows.values()), 2), **rows}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.array(values), q))


async def _run_bounded(
    bodies: list[dict[str, Any]], concurrency: int, one: Any
) -> tuple[float, list[float], int]:
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


async def _graph(
    bodies: list[dict[str, Any]], concurrency: int, url: str
) -> tuple[float, list[float], int]:
    """The load through HTTP. aiohttp, not httpx: the client shares the 2 cores with the server
    here, and aiohttp spends about half of httpx's CPU per streamed request."""
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:

        async def one(body: dict[str, Any]) -> float:
            start = time.perf_counter()
            first = None
            payload = json.dumps({**body, "stream": True})
            headers = {"content-type": "application/json"}
            async with client.post("/v1/chat/completions", data=payload, headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                async for line in resp.content:
                    if first is None and line.startswith(b"data: ") and b'"content"' in line:
                        first = time.perf_counter() - start
                    if b'"error"' in line:
                        raise RuntimeError(line.decode())
            return first if first is not None else time.perf_counter() - start

        await one(bodies[0])  # warm-up
        return await _run_bounded(bodies, concurrency, one)


async def _inproc(
    bodies: list[dict[str, Any]], concurrency: int, args: Any
) -> tuple[float, list[float], int]:
    import torch

    from internvl_core.config import ModelArchitecture
    from internvl_core.engine import AsyncLLMEngine, LLMEngine
    from internvl_core.preprocess.request import RequestPreparer
    from internvl_core.protocol import ChatCompletionRequest
    from internvl_core.tokenizer import load_tokenizer
    from internvl_core.vision import VisionEncoder

    arch = ModelArchitecture.from_checkpoint(args.model_path)
    preparer = RequestPreparer(
        arch, load_tokenizer(args.model_path), args.media, args.engine, args.default_sampling
    )
    vision = VisionEncoder.from_checkpoint(args.model_path, dtype=torch.float32)
    engine = AsyncLLMEngine(LLMEngine.from_checkpoint(args.model_path, args.engine))
    counter = iter(range(10**9))

    async def one(body: dict[str, Any]) -> float:
        start = time.perf_counter()
        request = ChatCompletionRequest.model_validate(body)
        prepared = await preparer.prepare(request, f"r{next(counter)}")
        embeds = None
        if prepared.images:
            pixels = np.concatenate([image.pixel_values for image in prepared.images])
            embeds = (await asyncio.to_thread(vision.encode, pixels)).reshape(
                -1, vision.llm_hidden_size
            )
        first = None
        async for out in engine.generate(
            prepared.request_id, prepared.prompt_token_ids, prepared.sampling, image_embeds=embeds
        ):
            if first is None and out.token_ids:
                first = time.perf_counter() - start
        return first if first is not None else time.perf_counter() - start

    await one(bodies[0])
    return await _run_bounded(bodies, concurrency, one)


def _tiny_app_config(model_path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """tiny.yaml's `args` (with `model_path` replaced) and its `logging_config`."""
    config = yaml.safe_load(Path("serve_configs/tiny.yaml").read_text())
    app = config["applications"][0]
    return {**app["args"], "model_path": model_path}, app.get("logging_config")


def _device() -> str:
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--image-share", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a new tiny one)")
    parser.add_argument(
        "--serve-defaults",
        action="store_true",
        help="run Ray Serve with its default settings instead of deployments/serve_env.py's",
    )
    opts = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from internvl_core.serve_args import ServeArgs
    from internvl_core.testing import make_tiny_checkpoint

    model_path = opts.model or str(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny"))
    app_args, logging_config = _tiny_app_config(model_path)
    args = ServeArgs.model_validate(app_args)
    bodies = _bodies(args.model_name, opts.requests, opts.image_share, opts.max_tokens)

    cpu0 = _cpu_seconds()
    in_s, in_ttft, in_err = asyncio.run(_inproc(bodies, opts.concurrency, args))
    inproc_cpu = _core_ms_per_request(cpu0, _cpu_seconds(), opts.requests)

    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.serve_env import THROUGHPUT_ENV, direct_ingress_urls

    # The Ray workers run as `make run` runs them (deployments/serve_env.py); this driver keeps
    # Ray's defaults. Both fronts are measured: the ingress replica's own port (what a load
    # balancer or Serve's HAProxy targets) and Serve's Python proxy.
    env = {} if opts.serve_defaults else THROUGHPUT_ENV
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"env_vars": env},
    )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="bench", route_prefix="/", logging_config=logging_config)
    proxy_url = f"http://127.0.0.1:{port}"
    direct = direct_ingress_urls("bench", host="127.0.0.1")
    try:
        front_url = (direct or [proxy_url])[0]
        asyncio.run(_graph(bodies[:64], opts.concurrency, front_url))  # warm every stage
        cpu0 = _cpu_seconds()
        g_s, g_ttft, g_err = asyncio.run(_graph(bodies, opts.concurrency, front_url))
        graph_cpu = _core_ms_per_request(cpu0, _cpu_seconds(), opts.requests)
        p_s, _, p_err = (
            asyncio.run(_graph(bodies, opts.concurrency, proxy_url)) if direct else (g_s, [], g_err)
        )
    finally:
        serve.shutdown()
        ray.shutdown()

    graph_req_s = opts.requests / g_s
    proxy_req_s = opts.requests / p_s
    inproc_req_s = opts.requests / in_s
    print(
        json.dumps(
            {
                "requests": opts.requests,
                "concurrency": opts.concurrency,
                "image_share": opts.image_share,
                "max_tokens": opts.max_tokens,
                "front": "direct-ingress" if direct else "serve-proxy",
                "graph_req_s": round(graph_req_s, 2),
                "inproc_req_s": round(inproc_req_s, 2),
                "ratio": round(graph_req_s / inproc_req_s, 3),
                "graph_via_proxy_req_s": round(proxy_req_s, 2),
                "ratio_via_proxy": round(proxy_req_s / inproc_req_s, 3),
                "ttft_p50_ms": round(_percentile(g_ttft, 50) * 1e3, 1),
                "ttft_p99_ms": round(_percentile(g_ttft, 99) * 1e3, 1),
                "inproc_ttft_p50_ms": round(statistics.median(in_ttft) * 1e3, 1)
                if in_ttft
                else None,
                "errors": g_err + p_err,
                "inproc_errors": in_err,
                "graph_core_ms_per_req": graph_cpu,
                "inproc_core_ms_per_req": inproc_cpu,
                "device": _device(),
            }
        )
    )


if __name__ == "__main__":
    main()
