"""Metrics through Ray's metrics API (`ray.util.metrics`), so they reach Ray's Prometheus endpoint.

One small class per deployment; each records only what its stage knows. Ray prefixes every name
with `ray_` on export (`ray_internvl_requests_total`). Ray 2.60 counts a histogram observation
into its bucket exactly but adds the bucket's midpoint to `_sum` (its OpenTelemetry recorder):
read latencies from the buckets.
"""

from __future__ import annotations

import collections

from ray.util.metrics import Counter, Gauge, Histogram

from internvl_core.engine.outputs import EngineStats

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_TOKEN_GAP_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5]

DISCONNECT_STATUS = "499"  # nginx's "client closed request": the client left before the end
PREFIX_WINDOW_S = 60.0


def time_per_output_token(first_token_at: float, end_at: float, num_output_tokens: int) -> float:
    """(end - first token) / (output tokens - 1), as `vllm bench serve` defines TPOT.

    Callers pass choices with at least 2 output tokens (one token has no time per token).
    """
    return (end_at - first_token_at) / (num_output_tokens - 1)


class IngressMetrics:
    """Chat requests by final HTTP status, TTFT, TPOT per choice and end-to-end latency."""

    def __init__(self) -> None:
        self.requests = Counter(
            "internvl_requests_total",
            f"chat requests by final HTTP status ({DISCONNECT_STATUS}: client disconnected)",
            tag_keys=("status",),
        )
        self.ttft = Histogram(
            "internvl_ttft_seconds", "arrival to the first generated token", _LATENCY_S
        )
        self.tpot = Histogram(
            "internvl_tpot_seconds",
            "per choice: (end - first token) / (output tokens - 1)",
            _TOKEN_GAP_S,
        )
        self.latency = Histogram(
            "internvl_request_seconds", "arrival to the last byte of a 200 response", _LATENCY_S
        )

    def request_done(self, status: str, seconds: float) -> None:
        """Count one chat request's outcome: its HTTP status, or DISCONNECT_STATUS."""
        self.requests.inc(1, tags={"status": status})
        if status == "200":
            self.latency.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def choice_done(self, first_token_at: float | None, end_at: float, num_tokens: int) -> None:
        """One finished choice's TPOT (choices with under 2 tokens have none)."""
        if first_token_at is not None and num_tokens > 1:
            self.tpot.observe(time_per_output_token(first_token_at, end_at, num_tokens))


class PrefixCacheWindow:
    """The prefix-cache hit rate over the last `window_s` seconds, from cumulative counters.

    Keeps the readings of the window plus the last one before it (the window's baseline); the
    rate is hit tokens / queried tokens between the baseline and the newest reading.
    """

    def __init__(self, window_s: float = PREFIX_WINDOW_S) -> None:
        self.window_s = window_s
        self.readings: collections.deque[tuple[float, int, int]] = collections.deque()

    def add(self, now: float, queried: int, hit: int) -> None:
        self.readings.append((now, queried, hit))
        while len(self.readings) > 1 and self.readings[1][0] <= now - self.window_s:
            self.readings.popleft()

    def rate(self) -> float:
        """Hits per queried token in the window; 0.0 when nothing was looked up in it."""
        if not self.readings:
            return 0.0
        _, queried_then, hit_then = self.readings[0]
        _, queried_now, hit_now = self.readings[-1]
        queried = queried_now - queried_then
        return (hit_now - hit_then) / queried if queried > 0 else 0.0


class TokenTimer:
    """One engine stream's timing: queue time once, then the gap before each new token."""

    def __init__(self) -> None:
        self.last_token_at: float | None = None
        self.queue_time_s: float | None = None

    def tick(self, now: float, num_tokens: int, queue_time_s: float | None) -> list[float]:
        """Inter-token gaps ended by this output (a gap spread evenly over several tokens)."""
        if self.queue_time_s is None:
            self.queue_time_s = queue_time_s
        if num_tokens == 0:
            return []
        last, self.last_token_at = self.last_token_at, now
        if last is None:  # the first output: its tokens end TTFT, not an inter-token gap
            return []
        return [(now - last) / num_tokens] * num_tokens


class EngineMetrics:
    """Engine gauges (queues, KV blocks, recent prefix-cache hit rate), prefix-cache token
    counters, inter-token latency and queue time of one LLM replica."""

    def __init__(self, window_s: float = PREFIX_WINDOW_S) -> None:
        self.waiting = Gauge("internvl_engine_waiting", "sequences waiting")
        self.running = Gauge("internvl_engine_running", "sequences running")
        self.kv_used = Gauge("internvl_kv_blocks_used", "KV blocks in use")
        self.kv_free = Gauge("internvl_kv_blocks_free", "KV blocks free")
        self.prefix_hit = Gauge(
            "internvl_prefix_cache_hit_rate",
            f"prefix-cache hit tokens / queried tokens over the last {window_s:g} s",
        )
        self.prefix_queried = Counter(
            "internvl_prefix_cache_queried_tokens_total", "prompt tokens looked up"
        )
        self.prefix_hits = Counter(
            "internvl_prefix_cache_hit_tokens_total", "prompt tokens served from the cache"
        )
        self.itl = Histogram(
            "internvl_inter_token_latency_seconds", "gap between consecutive tokens", _TOKEN_GAP_S
        )
        self.queue_time = Histogram(
            "internvl_queue_time_seconds", "engine arrival to first scheduled", _LATENCY_S
        )
        self.window = PrefixCacheWindow(window_s)
        self._counted = (0, 0)  # (queried, hit) already added to the counters

    def record(self, stats: EngineStats, now: float) -> None:
        """Refresh the gauges and counters from one reading of the engine's stats."""
        self.waiting.set(stats.num_waiting)
        self.running.set(stats.num_running)
        self.kv_used.set(stats.kv_blocks_total - stats.kv_blocks_free)
        self.kv_free.set(stats.kv_blocks_free)
        queried, hit = stats.prefix_cache_queried_tokens, stats.prefix_cache_hit_tokens
        self.window.add(now, queried, hit)
        self.prefix_hit.set(self.window.rate())
        if queried > self._counted[0]:
            self.prefix_queried.inc(queried - self._counted[0])
        if hit > self._counted[1]:
            self.prefix_hits.inc(hit - self._counted[1])
        self._counted = (queried, hit)

    def output(self, timer: TokenTimer, now: float, num_tokens: int, queue_s: float | None) -> None:
        """One engine output of a stream: its token gaps, and the queue time when first known."""
        known = timer.queue_time_s is not None
        for gap in timer.tick(now, num_tokens, queue_s):
            self.itl.observe(gap)
        if not known and timer.queue_time_s is not None:
            self.queue_time.observe(timer.queue_time_s)


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
