"""The metric arithmetic: TPOT as `vllm bench serve` defines it, the windowed prefix-cache hit
rate from cumulative counters, and inter-token gaps and queue time from engine outputs.
(What reaches Ray's Prometheus endpoint is checked by tests/test_serve_metrics.py.)"""

from __future__ import annotations

import pytest

from deployments.metrics import (
    EngineMetrics,
    PrefixCacheWindow,
    TokenTimer,
    time_per_output_token,
)
from internvl_core.engine.outputs import EngineStats


def test_tpot_excludes_the_first_token() -> None:
    # first token at 1.0 s, 5 tokens, last at 1.8 s: 4 gaps of 0.2 s
    assert time_per_output_token(1.0, 1.8, 5) == pytest.approx(0.2)


def test_prefix_hit_rate_is_over_the_window_not_the_lifetime() -> None:
    window = PrefixCacheWindow(window_s=10.0)
    window.add(0.0, queried=0, hit=0)
    window.add(5.0, queried=100, hit=100)  # a burst of hits early on
    assert window.rate() == pytest.approx(1.0)
    window.add(20.0, queried=200, hit=100)  # then 100 misses
    window.add(30.0, queried=300, hit=110)
    # lifetime: 110 / 300; the last 10 s (baseline the reading at 20 s): 10 / 100
    assert window.rate() == pytest.approx(0.1)
    window.add(45.0, queried=300, hit=110)
    assert window.rate() == 0.0  # nothing looked up in the window


def test_token_timer_gaps_and_queue_time() -> None:
    timer = TokenTimer()
    assert timer.tick(0.0, 0, None) == []  # not scheduled yet (e.g. an abort)
    assert timer.tick(1.0, 1, 0.25) == []  # the first token ends TTFT
    assert timer.tick(1.5, 1, 0.25) == [0.5]
    assert timer.tick(2.5, 2, 0.25) == [0.5, 0.5]  # two tokens in one output share the gap
    assert timer.queue_time_s == 0.25


def _stats(queried: int, hit: int, free: int = 6) -> EngineStats:
    return EngineStats(
        num_waiting=1,
        num_running=2,
        num_in_flight_batches=0,
        kv_blocks_total=10,
        kv_blocks_free=free,
        kv_block_size=4,
        prefix_cache_hit_rate=0.0,
        num_preemptions=0,
        prefix_cache_queried_tokens=queried,
        prefix_cache_hit_tokens=hit,
    )


def test_engine_metrics_record_windows_the_counters() -> None:
    metrics = EngineMetrics(window_s=5.0)
    metrics.record(_stats(0, 0), now=0.0)
    metrics.record(_stats(40, 40), now=1.0)
    metrics.record(_stats(80, 40), now=10.0)
    assert metrics.window.rate() == 0.0  # 40 queried, no hit in the last 5 s
