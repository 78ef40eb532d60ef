"""Shared helpers for tests that start Ray Serve: a local cluster with logical GPUs on 127.0.0.1,
fast deployment options, apps deployed and deleted by context manager, and polling.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
from ray import serve

from deployments.app import build_app
from deployments.serve_env import THROUGHPUT_ENV, direct_ingress_urls
from internvl_core.serve_args import DeploymentOptions, ServeArgs

FAST_SHUTDOWN_S = 0.5
HEALTH_PERIOD_S = 1.0
METRICS_REPORT_MS = 500


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_cluster(
    *,
    num_cpus: int = 8,
    num_gpus: int = 4,
    throughput_mode: bool = False,
    metrics_export_port: int | None = None,
) -> Iterator[str]:
    """A fresh local Ray cluster (GPUs are logical) with Serve's HTTP proxy on 127.0.0.1.

    Yields the proxy's base URL. Token auth is off for this local-only cluster (ray-serve-notes
    sec. 4). `throughput_mode` runs every Ray worker as `make run` does (deployments/serve_env):
    the ingress replica then also serves HTTP itself, on 127.0.0.1 from port 30000. The driver
    keeps Ray's defaults, so its synchronous handle calls work. With `metrics_export_port`,
    Ray's Prometheus endpoint serves `/metrics` there, refreshed every half second.
    """
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    port = free_port()
    env_vars = {"HF_HUB_OFFLINE": "1", **(THROUGHPUT_ENV if throughput_mode else {})}
    metrics: dict[str, Any] = {}
    if metrics_export_port is not None:
        metrics = {
            "_metrics_export_port": metrics_export_port,
            "_system_config": {"metrics_report_interval_ms": METRICS_REPORT_MS},
        }
    # "local": a plain ray.init() would join any cluster recorded in /tmp/ray by `ray start` or
    # `ray.cluster_utils.Cluster` (another test or engineer on this machine).
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env_vars},
        **metrics,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def fast_options(**overrides: Any) -> DeploymentOptions:
    """Deployment options with short health-check and graceful-shutdown periods for tests."""
    values: dict[str, Any] = {
        "num_cpus": 0,
        "health_check_period_s": HEALTH_PERIOD_S,
        "graceful_shutdown_timeout_s": FAST_SHUTDOWN_S,
    }
    return DeploymentOptions(**{**values, **overrides})


def tiny_serve_args(model_path: Path, **overrides: Any) -> ServeArgs:
    """ServeArgs for a tiny checkpoint in fp32 with fast options on every deployment.

    `overrides` replace whole top-level fields (e.g. `engine=EngineConfig(...)`).
    """
    values: dict[str, Any] = {
        "model_path": str(model_path),
        "served_model_name": "internvl2-tiny-test",
        "dtype": "float32",
        "ingress": fast_options(max_ongoing_requests=64, max_queued_requests=64),
        "preprocess": fast_options(max_ongoing_requests=32, max_queued_requests=64),
        "vision_encoder": fast_options(
            max_ongoing_requests=64, max_queued_requests=64, num_gpus="auto"
        ),
        "llm": fast_options(max_ongoing_requests=64, max_queued_requests=64, num_gpus="auto"),
    }
    return ServeArgs(**{**values, **overrides})


@contextlib.contextmanager
def deployed_app(args: ServeArgs, name: str, route_prefix: str = "/") -> Iterator[list[str]]:
    """`build_app(args)` running on `route_prefix` until the block ends, then deleted.

    Yields the ingress replicas' own URLs (direct ingress, `throughput_mode` clusters), else [];
    the app answers below `route_prefix` on them as on Serve's proxy.
    """
    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    try:
        yield direct_ingress_urls(name, host="127.0.0.1")
    finally:
        serve.delete(name)


def engine_idle(stats: dict[str, Any]) -> bool:
    """An LLM replica's `stats()` with nothing running or waiting and every KV block free."""
    return (
        stats["num_running"] == 0
        and stats["num_waiting"] == 0
        and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    )


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
