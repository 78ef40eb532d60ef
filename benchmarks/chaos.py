"""Chaos under load: mixed requests (text and image, streaming and not) against the tiny model's
graph (two vision replicas, two PP=2 LLM replicas) while a VisionEncoder replica, an LLM replica
and a pipeline stage actor are killed; the same run as tests/test_serve_chaos.py.

Prints one JSON line: requests, ok, lost, errors_by_status (HTTP status, or sse_error for a
stream that ended with an error event), unclear (5xx other than 503, hangs, broken streams: 0
is the goal), recovery_s and lost_per_kill per kill, in-flight requests at each kill, device.
Run from the repository root (it uses the tests' helpers): `python -m benchmarks.chaos`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
from pathlib import Path

from internvl_core.testing.tiny import make_tiny_checkpoint
from tests.chaos_load import CHAOS_KILLS, CHAOS_REPLICAS, ChaosRun, chaos_args, mixed_bodies
from tests.serve_fixtures import deployed_app, serve_cluster

APP = "chaos"
MODEL = "internvl2-tiny-chaos"


def _device() -> str:
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=5.0, help="requests started per second")
    parser.add_argument("--image-share", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a new tiny one)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(opts.model or make_tiny_checkpoint(Path(tmp) / "tiny", family="qwen2"))
        bodies = mixed_bodies(
            MODEL, opts.requests, image_share=opts.image_share, max_tokens=opts.max_tokens
        )
        with (
            serve_cluster(num_cpus=8, num_gpus=8) as url,
            deployed_app(chaos_args(model_path, MODEL), APP),
        ):
            run = ChaosRun(url, APP, MODEL, replicas=CHAOS_REPLICAS)
            asyncio.run(
                run.run(bodies, CHAOS_KILLS, concurrency=opts.concurrency, rate_per_s=opts.rate)
            )
    out = run.report.summary()
    out["concurrency"] = opts.concurrency
    out["device"] = _device()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
