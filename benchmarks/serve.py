"""Serve graph vs the same stages in one process: a bounded text/image/video load on the tiny model.

Runs N requests at a fixed concurrency (a) through the Ray Serve graph over HTTP (streaming, to
time the first token) and (b) through the same preprocess + vision + engine code in-process, then
prints one JSON line: graph_req_s, inproc_req_s, ratio, errors, device, and the graph's standard
serving metrics as `vllm bench serve` defines them (serving_metrics.py): TTFT, TPOT, ITL and
E2EL (mean, p50, p90, p99 ms), request / output-token throughput, goodput for `--goodput`
targets, and the latencies per request kind (`by_kind`); `--trace FILE` writes every request's
timings as JSONL.

(c) replays the load through the real ingress with model-free stages (plumbing_stages.py):
`plumbing_req_s` is what the graph's own HTTP + Serve plumbing allows on this machine when the
models cost nothing, and `ratio_ceiling` = plumbing_req_s / inproc_req_s bounds `ratio`.
CPU per request of every process is reported for each path (`*_core_ms_per_req`); with the
plumbing's F and the in-process work W, `ratio_cpu_bound` = cores / (F + W) / inproc_req_s is
the most the graph can reach on these cores, the in-process path being held by one GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from serve_load import request_bodies, run_bounded, stream_load
from serving_metrics import (
    RequestRecord,
    parse_goodput,
    summarize,
    summarize_by_kind,
    write_trace,
)

WARMUP_REQUESTS = 64  # each path serves these first, unmeasured (torch and Ray warm up)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def _cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds spent between two `_cpu_seconds()` by process name (pids summed)."""
    spent: dict[str, float] = {}
    for key, seconds in after.items():
        name = key.rsplit("#", 1)[0]
        spent[name] = spent.get(name, 0.0) + seconds - before.get(key, 0.0)
    return spent


def _per_request(spent: dict[str, float], n: int) -> dict[str, float]:
    """Core-milliseconds per request by process name, largest first, with their total."""
    rows = {k: round(v * 1e3 / n, 2) for k, v in spent.items() if v * 1e3 / n >= 0.1}
    rows = dict(sorted(rows.items(), key=lambda kv: -kv[1]))
    return {"total": round(sum(rows.values()), 2), **rows}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.array(values), q))


def _inproc_stages(args: Any) -> tuple[Any, Any, Any]:
    """The in-process preparer, vision encoder and engine, loaded before any CPU is counted."""
    import torch

    from internvl_core.config import ModelArchitecture
    from internvl_core.engine import AsyncLLMEngine, LLMEngine
    from internvl_core.preprocess.request import RequestPreparer
    from internvl_core.tokenizer import load_tokenizer
    from internvl_core.vision import VisionEncoder

    arch = ModelArchitecture.from_checkpoint(args.model_path)
    preparer = RequestPreparer(
        arch, load_tokenizer(args.model_path), args.media, args.engine, args.default_sampling
    )
    vision = VisionEncoder.from_checkpoint(args.model_path, dtype=torch.float32)
    engine = AsyncLLMEngine(LLMEngine.from_checkpoint(args.model_path, args.engine))
    return preparer, vision, engine


async def _inproc(
    bodies: list[dict[str, Any]], concurrency: int, stages: tuple[Any, Any, Any]
) -> tuple[float, list[float], int]:
    from internvl_core.protocol import ChatCompletionRequest

    preparer, vision, engine = stages
    counter = iter(range(10**9))

    async def one(body: dict[str, Any]) -> float:
        start = time.perf_counter()
        request = ChatCompletionRequest.model_validate(body)
        prepared = await preparer.prepare(request, f"r{next(counter)}")
        embeds = None
        if prepared.images:
            pixels = np.concatenate([image.tiles for image in prepared.images])
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

    return await run_bounded(bodies, concurrency, one)


def _plumbing_app(args: Any, events_per_request: int) -> Any:
    """The real ingress over model-free stages (plumbing_stages.py): every HTTP request, Serve
    call and streamed event of the real graph, with the same array sizes, no model work. The
    real graph cannot beat its rate, so `ratio_ceiling` (its rate over the in-process one)
    bounds `ratio` on this machine whatever the stages' models cost."""
    import plumbing_stages
    from ray import cloudpickle

    from deployments.app import compose_app

    cloudpickle.register_pickle_by_value(plumbing_stages)  # benchmarks/ is not on workers' path
    return compose_app(
        args,
        plumbing_stages.PlumbingPreprocess,
        plumbing_stages.PlumbingVision,
        plumbing_stages.plumbing_llm(events_per_request),
    )


@dataclass
class _Path:
    """One way of serving the load; the rates, TTFTs, errors and CPU of its passes add up here."""

    run: Callable[[list[dict[str, Any]]], Awaitable[tuple[float, list[float], int]]]
    rates: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    requests: int = 0
    seconds: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)

    def measure(self, bodies: list[dict[str, Any]]) -> float:
        before = _cpu_seconds()
        seconds, ttfts, errors = asyncio.run(self.run(bodies))
        for name, spent in _cpu_spent(before, _cpu_seconds()).items():
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + spent
        self.seconds += seconds
        self.rates.append(len(bodies) / seconds)
        self.ttfts += ttfts
        self.errors += errors
        self.requests += len(bodies)
        return self.rates[-1]

    def core_ms_per_request(self) -> dict[str, float]:
        return _per_request(self.cpu_s, self.requests)


def _tiny_app_config(model_path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """tiny.yaml's `args` (with `model_path` replaced) and its `logging_config`."""
    config = yaml.safe_load(Path("serve_configs/tiny.yaml").read_text())
    app = config["applications"][0]
    return {**app["args"], "model_path": model_path}, app.get("logging_config")


def _device() -> str:
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _standard_metrics(
    records: list[RequestRecord], seconds: float, opts: argparse.Namespace
) -> dict[str, Any]:
    """The graph's measured rounds as `vllm bench serve` reports them; the trace written."""
    if opts.trace:
        origin = min((r.start_s for r in records), default=0.0)
        write_trace(opts.trace, [replace(r, start_s=r.start_s - origin) for r in records])
    out = summarize(records, seconds, parse_goodput(opts.goodput))
    out["by_kind"] = summarize_by_kind(records)
    return out


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--image-share", type=float, default=0.5)
    parser.add_argument("--video-share", type=float, default=0.0, help="requests with a clip")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--ignore-eos", action="store_true", help="send ignore_eos: every answer is max_tokens"
    )
    parser.add_argument(
        "--goodput",
        nargs="*",
        default=[],
        metavar="KEY=MS",
        help="latency targets for goodput: ttft_ms=500 tpot_ms=50 e2el_ms=2000",
    )
    parser.add_argument("--trace", default=None, help="write per-request timings here (JSONL)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measured passes of each path, interleaved; rates and ratios are their medians",
    )
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a new tiny one)")
    parser.add_argument(
        "--serve-defaults",
        action="store_true",
        help="run Ray Serve with its default settings instead of deployments/serve_env.py's",
    )
    parser.add_argument(
        "--no-plumbing",
        action="store_true",
        help="skip the model-free graph that measures the plumbing's own cost (ratio_ceiling)",
    )
    opts = parser.parse_args()
    parse_goodput(opts.goodput)  # a typo fails now, not after the run
    return opts


def main() -> None:
    opts = _parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from internvl_core.serve_args import ServeArgs
    from internvl_core.testing import make_tiny_checkpoint

    model_path = opts.model or str(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny"))
    app_args, logging_config = _tiny_app_config(model_path)
    args = ServeArgs.model_validate(app_args)
    bodies = request_bodies(
        args.model_name,
        opts.requests,
        image_share=opts.image_share,
        video_share=opts.video_share,
        max_tokens=opts.max_tokens,
        ignore_eos=opts.ignore_eos,
    )
    warmup = bodies[:WARMUP_REQUESTS]
    conc = opts.concurrency
    stages = _inproc_stages(args)

    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.serve_env import THROUGHPUT_ENV, direct_ingress_urls

    # The Ray workers run as `make run` runs them (deployments/serve_env.py); this driver keeps
    # Ray's defaults. The graph is measured through the ingress replica's own port (what a load
    # balancer or Serve's HAProxy targets), and once through Serve's Python proxy.
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
    front_url = (direct or [proxy_url])[0]
    paths: dict[str, _Path] = {}
    try:
        chunks: list[int] = []
        records: list[RequestRecord] = []  # the graph's measured rounds
        asyncio.run(_inproc(warmup, conc, stages))
        asyncio.run(stream_load(warmup, conc, front_url, chunks))
        paths["inproc"] = _Path(lambda b: _inproc(b, conc, stages))
        paths["graph"] = _Path(lambda b: stream_load(b, conc, front_url, chunks, records=records))
        if not opts.no_plumbing and direct:
            events = max(1, round(statistics.mean(chunks)) - 1)  # less the role chunk
            app = _plumbing_app(args, events)
            serve.run(app, name="plumbing", route_prefix="/plumbing", logging_config=logging_config)
            plumbing_url = direct_ingress_urls("plumbing", host="127.0.0.1")[0]
            asyncio.run(stream_load(warmup, conc, plumbing_url, prefix="/plumbing"))
            paths["plumbing"] = _Path(
                lambda b: stream_load(b, conc, plumbing_url, prefix="/plumbing")
            )
        # Interleaved rounds, the order rotating: a slower minute on this shared machine hits
        # every path alike.
        chunks.clear()
        names = list(paths)
        for r in range(opts.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                paths[name].measure(bodies)
        proxy = _Path(lambda b: stream_load(b, conc, proxy_url))
        if direct:
            proxy.measure(bodies)
    finally:
        serve.shutdown()
        ray.shutdown()

    inproc, graph = paths["inproc"], paths["graph"]
    inproc_req_s = statistics.median(inproc.rates)
    ratios = [g / i for g, i in zip(graph.rates, inproc.rates, strict=True)]
    out: dict[str, Any] = {
        "requests": opts.requests,
        "concurrency": conc,
        "image_share": opts.image_share,
        "video_share": opts.video_share,
        "max_tokens": opts.max_tokens,
        "rounds": opts.rounds,
        "front": "direct-ingress" if direct else "serve-proxy",
        "graph_req_s": round(statistics.median(graph.rates), 2),
        "inproc_req_s": round(inproc_req_s, 2),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_per_round": [round(r, 3) for r in ratios],
        **_standard_metrics(records, graph.seconds, opts),
        "inproc_ttft_p50_ms": round(_percentile(inproc.ttfts, 50) * 1e3, 1),
        "errors": graph.errors + proxy.errors,
        "inproc_errors": inproc.errors,
        "graph_core_ms_per_req": graph.core_ms_per_request(),
        "inproc_core_ms_per_req": inproc.core_ms_per_request(),
        "sse_chunks_per_req": round(statistics.mean(chunks), 2) if chunks else None,
    }
    if proxy.rates:
        out["graph_via_proxy_req_s"] = round(proxy.rates[0], 2)
        out["ratio_via_proxy"] = round(proxy.rates[0] / inproc_req_s, 3)
    if "plumbing" in paths:
        plumbing = paths["plumbing"]
        ceilings = [p / i for p, i in zip(plumbing.rates, inproc.rates, strict=True)]
        out["plumbing_req_s"] = round(statistics.median(plumbing.rates), 2)
        out["ratio_ceiling"] = round(statistics.median(ceilings), 3)
        # The graph's processes redo the in-process work W on top of the plumbing F, all on
        # this machine's cores: at best cores / (F + W) requests per second.
        both = inproc.core_ms_per_request()["total"] + plumbing.core_ms_per_request()["total"]
        cpu_bound_req_s = (os.cpu_count() or 1) * 1e3 / both
        out["ratio_cpu_bound"] = round(cpu_bound_req_s / inproc_req_s, 3)
        out["plumbing_errors"] = plumbing.errors
        out["plumbing_core_ms_per_req"] = plumbing.core_ms_per_request()
    out["device"] = _device()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
