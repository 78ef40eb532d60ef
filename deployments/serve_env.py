"""The Ray Serve process settings this project runs with (environment variables, read by Ray at
import time in every Ray process, so they must be set before `ray start` / `serve run`).

`RAY_SERVE_THROUGHPUT_OPTIMIZED=1` is Ray's high-throughput mode: the ingress replica runs its
own HTTP server (direct ingress, ports from 30000 on the replica's host, bound to
`http_options.host`), user code and the handle router share the replica's event loop, and
handles default to gRPC by value. Our handles choose by value or by reference per call
themselves (`deployments/ingress.py`), so the graph behaves the same in either mode.

Measured on the tiny graph, 2 shared cores, `benchmarks/serve.py --requests 600` (concurrency
32, half with an image, 32 tokens): 66 core-ms per request with Serve's defaults through its
Python proxy, 34 through the ingress port in this mode (same code, same command). Per Serve call
(a 2-deployment toy app, this mode): 1.4 core-ms unary by value, 3.8 by reference; 2.4 vs 5.9
for a 5-item stream.

Ray's mode also turns replica logs on stderr off; they stay on here so `serve run` shows them.
One Ray setting is the ingress replica's alone, set by `build_app` in its runtime_env
(`deployments/app.py`, INGRESS_RAY_ENV): it inlines call arguments up to 1 MB.
"""

from __future__ import annotations

THROUGHPUT_ENV: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_LOG_TO_STDERR": "1",
}
REPLICA_TARGET_PREFIX = "SERVE_REPLICA::"  # proxy targets are named after the proxy actor


def direct_ingress_urls(app_name: str, *, host: str | None = None) -> list[str]:
    """The HTTP URLs of `app_name`'s ingress replicas when direct ingress is on, else [].

    This is what a load balancer (or Serve's HAProxy) targets. Asks the Serve controller for
    the app's target groups (`TargetGroup` is Ray's alpha public schema; the controller call is
    the one Ray's own test utilities use). The targets carry the node's IP; a replica serving
    on `http_options.host: 127.0.0.1` is reached with `host="127.0.0.1"` from the same node.
    """
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    groups = ray.get(controller.get_target_groups.remote(app_name))
    return [
        f"http://{host or target.ip}:{target.port}"
        for group in groups
        if group.protocol == RequestProtocol.HTTP and group.app_name == app_name
        for target in group.targets
        if target.name.startswith(REPLICA_TARGET_PREFIX)
    ]
