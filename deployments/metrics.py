"""Metrics through Ray's metrics API (`ray.util.metrics`), so they reach Ray's Prometheus endpoint.

One small class per deployment; each records only what its stage knows.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_TPOT_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1]


class IngressMetrics:
    """Requests by status, TTFT and time per output token."""

    def __init__(self) -> None:
        self.requests = Counter(
            "internvl_requests_total", "chat requests by final status", tag_keys=("status",)
        )
        self.ttft = Histogram("internvl_ttft_seconds", "time to first token", _LATENCY_S)
        self.tpot = Histogram("internvl_tpot_seconds", "time per output token", _TPOT_S)
        self.latency = Histogram("internvl_request_seconds", "request latency", _LATENCY_S)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def request_done(self, status: str, seconds: float | None, num_tokens: int = 0) -> None:
        self.requests.inc(1, tags={"status": status})
        if seconds is not None:
            self.latency.observe(seconds)
            if num_tokens > 1:
                self.tpot.observe(seconds / num_tokens)


class EngineMetrics:
    """Waiting/running sequences, KV blocks used/free, prefix-cache hit rate."""

    def __init__(self) -> None:
        self.waiting = Gauge("internvl_engine_waiting", "sequences waiting")
        self.running = Gauge("internvl_engine_running", "sequences running")
        self.kv_used = Gauge("internvl_kv_blocks_used", "KV blocks in use")
        self.kv_free = Gauge("internvl_kv_blocks_free", "KV blocks free")
        self.prefix_hit = Gauge("internvl_prefix_cache_hit_rate", "prefix cache hit rate")

    def record(self, *, waiting: int, running: int, used: int, free: int, hit: float) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        self.kv_used.set(used)
        self.kv_free.set(free)
        self.prefix_hit.set(hit)


class VisionMetrics:
    """Batch size in tiles, encode time, cache hits."""

    def __init__(self) -> None:
        self.batch_tiles = Histogram(
            "internvl_vision_batch_tiles", "tiles per encoder batch", [1, 2, 4, 8, 16, 32, 64, 128]
        )
        self.encode_s = Histogram("internvl_vision_encode_seconds", "encode time", _LATENCY_S)
        self.cache_hits = Counter("internvl_vision_cache_hits_total", "embedding cache hits")
        self.cache_misses = Counter("internvl_vision_cache_misses_total", "embedding cache misses")


class PreprocessMetrics:
    """Preprocess time and bytes fetched."""

    def __init__(self) -> None:
        self.seconds = Histogram("internvl_preprocess_seconds", "preprocess time", _LATENCY_S)
        self.bytes = Counter("internvl_media_bytes_total", "media bytes fetched")
