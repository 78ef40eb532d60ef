"""Metrics end to end: after a known mix of requests against the tiny graph, Ray's Prometheus
endpoint shows every outcome by status (200, 400, 404, 422, the ingress's 503 and a client
disconnect as 499), TTFT/TPOT/latency histograms with one observation per request or choice,
engine inter-token latency and queue time, and engine gauges refreshed while idle.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve_fixtures import (
    deployed_app,
    fast_options,
    free_port,
    serve_cluster,
    tiny_serve_args,
    wait_until,
)

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MODEL = "internvl2-tiny-test"
TIMEOUT_S = 60.0
EXPORT_WAIT_S = 30.0
NUM_TOKENS = 4


def chat(text: str, **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    return {**body, "max_tokens": NUM_TOKENS, "min_tokens": NUM_TOKENS, **fields}


async def request_mix(url: str) -> list[int]:
    """2 OK (unary, streamed), 400, 404, 422; then, while a long stream holds the only slot,
    a 503; then that stream's client disconnects (499)."""
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        codes = [
            (await client.post(url, json=chat("Hi."))).status_code,
            (await client.post(url, json=chat("Hi.", stream=True))).status_code,
            (await client.post(url, content=b"{")).status_code,
            (await client.post(url, json={**chat("Hi."), "model": "other"})).status_code,
            (await client.post(url, json=chat("Hi.", temperature=9))).status_code,
        ]
        long = chat("Go on.", max_tokens=2000, min_tokens=2000, stream=True)
        held = await client.send(client.build_request("POST", url, json=long), stream=True)
        codes.append(held.status_code)  # headers come after the first token
        try:
            codes.append((await client.post(url, json=chat("Hi."))).status_code)
        finally:
            await held.aclose()  # the client leaves mid-stream
    return codes


def scrape(port: int) -> dict[str, float]:
    """Ray's Prometheus text, each sample summed over Ray's own labels (node, worker, replica)
    and keyed by name plus our labels (`status`, `le`)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    totals: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "internvl_" not in sample.name:
                continue
            ours = {k: v for k, v in sample.labels.items() if k in ("status", "le")}
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(ours.items()))
            totals[key] += sample.value
    return totals


EXPECTED_STATUSES = {"200": 2, "400": 1, "404": 1, "422": 1, "503": 1, "499": 1}


def _statuses(metrics: dict[str, float]) -> dict[str, int]:
    prefix = "ray_internvl_requests_total|status="
    return {k.removeprefix(prefix): int(v) for k, v in metrics.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def scraped(tiny_qwen2: Path) -> Iterator[tuple[list[int], dict[str, float]]]:
    metrics_port = free_port()
    args = tiny_serve_args(
        tiny_qwen2,
        served_model_name=MODEL,
        ingress=fast_options(max_ongoing_requests=1, max_queued_requests=32),
    )
    with (
        serve_cluster(num_cpus=8, num_gpus=0, metrics_export_port=metrics_port) as url,
        deployed_app(args, "metrics"),
    ):
        codes = asyncio.run(request_mix(f"{url}/v1/chat/completions"))
        result: dict[str, float] = {}

        def exported() -> bool:
            result.update(scrape(metrics_port))
            return _statuses(result) == EXPECTED_STATUSES

        def idle() -> bool:  # the gauges refresh on their own after the disconnect's abort
            result.update(scrape(metrics_port))
            # gauges and counters reach the exporter on their own timers: wait for both
            counted = "ray_internvl_prefix_cache_queried_tokens_total" in result
            return result.get("ray_internvl_kv_blocks_used") == 0 and counted

        wait_until(exported, timeout_s=EXPORT_WAIT_S, interval_s=0.5)
        wait_until(idle, timeout_s=EXPORT_WAIT_S, interval_s=0.5)
        yield codes, result


def test_the_mix_got_the_statuses_it_was_built_for(scraped: Any) -> None:
    codes, _ = scraped
    assert codes == [200, 200, 400, 404, 422, 200, 503]


def test_every_outcome_is_counted_by_status(scraped: Any) -> None:
    _, metrics = scraped
    assert _statuses(metrics) == EXPECTED_STATUSES


def test_latency_histograms_count_requests_and_choices(scraped: Any) -> None:
    _, metrics = scraped
    assert metrics["ray_internvl_ttft_seconds_count"] == 3  # the two OK and the held stream
    assert metrics["ray_internvl_tpot_seconds_count"] == 2  # the choices that finished
    assert metrics["ray_internvl_request_seconds_count"] == 2  # 200s only
    assert metrics["ray_internvl_ttft_seconds_bucket|le=+Inf"] == 3
    # each OK request had NUM_TOKENS tokens: NUM_TOKENS - 1 gaps each, plus the held stream's
    assert metrics["ray_internvl_inter_token_latency_seconds_count"] >= 2 * (NUM_TOKENS - 1)
    assert metrics["ray_internvl_queue_time_seconds_count"] == 3


def test_engine_gauges_refresh_after_the_disconnect(scraped: Any) -> None:
    _, metrics = scraped
    assert metrics["ray_internvl_kv_blocks_used"] == 0  # the aborted stream's blocks are back
    assert metrics["ray_internvl_kv_blocks_free"] > 0
    assert metrics["ray_internvl_engine_running"] == 0
    assert metrics["ray_internvl_prefix_cache_queried_tokens_total"] > 0
    assert 0.0 <= metrics["ray_internvl_prefix_cache_hit_rate"] <= 1.0
