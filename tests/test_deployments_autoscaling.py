"""Tests for deployments/autoscaling.py: decisions, bounds and delays from hand-built Serve contexts
(no Ray cluster), and the replica metrics (`record_autoscaling_stats`) the policies read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from deployments.autoscaling import (
    KV_USAGE,
    PENDING_TILES,
    QUEUED_TILES,
    RUNNING_SEQS,
    WAITING_SEQS,
    EngineQueuePolicy,
    QueuedTilesPolicy,
    desired_llm_replicas,
)
from deployments.llm import LLMDeployment
from internvl_core.config import EngineConfig, SamplingParams
from internvl_core.preprocess.request import PreparedRequest
from internvl_core.serve_args import ServeArgs

DEPLOYMENT = DeploymentID(name="Pool", app_name="test")


def _context(
    metrics: dict[str, list[float]],
    *,
    current: int,
    target: int | None = None,
    min_replicas: int = 1,
    max_replicas: int = 8,
    delay_s: float = 0.0,
    policy_state: dict[str, Any] | None = None,
    requests: tuple[float, float] = (0.0, 0.0),
) -> AutoscalingContext:
    """A context like the controller's: `metrics[name][i]` is replica i's windowed mean (a list
    shorter than `current` leaves the last replicas unreported); `requests` is (running in the
    replicas, queued at the callers' handles)."""
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(current)]
    aggregated = {
        name: dict(zip(replicas, values, strict=False)) for name, values in metrics.items()
    }
    config = AutoscalingConfig(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        upscale_delay_s=delay_s,
        downscale_delay_s=delay_s,
    )
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name=DEPLOYMENT.name,
        app_name=DEPLOYMENT.app_name,
        current_num_replicas=current,
        target_num_replicas=current if target is None else target,
        running_replicas=replicas,
        total_num_requests=requests[0] + requests[1],
        total_queued_requests=requests[1],
        aggregated_metrics=aggregated,
        raw_metrics={},
        capacity_adjusted_min_replicas=min_replicas,
        capacity_adjusted_max_replicas=max_replicas,
        policy_state=dict(policy_state or {}),
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=time.time(),
        config=config,
    )


# ---- vision pool: queued tiles -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("tiles", "current", "expected"),
    [
        ([300.0, 250.0], 2, 3),  # 550 / 256 -> 2.15 -> 3
        ([512.0], 1, 2),  # an exact multiple adds no replica
        ([100.0, 0.0, 0.0], 3, 1),  # scale in to what the queue needs
        ([0.0, 0.0], 2, 1),  # idle: the minimum
        ([0.0], 1, 1),  # text-only load never reaches the pool
        ([5000.0], 1, 8),  # clamped to max_replicas
    ],
)
def test_vision_replicas_follow_pending_tiles(
    tiles: list[float], current: int, expected: int
) -> None:
    policy = QueuedTilesPolicy(target_tiles_per_replica=256)
    replicas, state = policy(_context({PENDING_TILES: tiles}, current=current))
    assert replicas == expected
    assert state == {PENDING_TILES: sum(tiles), QUEUED_TILES: 0.0}


@pytest.mark.parametrize(
    ("tiles", "requests", "expected"),
    [
        ([32.0, 32.0], (64.0, 500.0), 3),  # 1 tile each: 64 in the pool + 500 queued -> 564
        ([320.0], (32.0, 32.0), 3),  # 10 tiles each: 320 + 32 * 10 -> 640
        ([0.0], (4.0, 4.0), 1),  # cache hits only: queued ones still count one tile each
    ],
)
def test_vision_policy_counts_requests_queued_at_callers(
    tiles: list[float], requests: tuple[float, float], expected: int
) -> None:
    """A pool at its max_ongoing_requests holds few tiles when images are small; the requests
    waiting at the handles count at the pool's mean tiles per request."""
    policy = QueuedTilesPolicy(target_tiles_per_replica=256)
    ctx = _context({PENDING_TILES: tiles}, current=len(tiles), requests=requests)
    assert policy(ctx)[0] == expected


def test_vision_policy_uses_capacity_adjusted_bounds() -> None:
    policy = QueuedTilesPolicy(target_tiles_per_replica=256)
    ctx = _context({PENDING_TILES: [0.0, 0.0]}, current=2, min_replicas=2, max_replicas=3)
    assert policy(ctx)[0] == 2
    ctx = _context({PENDING_TILES: [4000.0, 0.0]}, current=2, min_replicas=2, max_replicas=3)
    assert policy(ctx)[0] == 3


def test_vision_policy_holds_until_a_replica_reports() -> None:
    policy = QueuedTilesPolicy(target_tiles_per_replica=256)
    assert policy(_context({}, current=1, target=3))[0] == 3
    assert policy(_context({PENDING_TILES: []}, current=2))[0] == 2


# ---- LLM replicas: waiting sequences and KV use ------------------------------------------------
@pytest.mark.parametrize(
    ("num_replicas", "waiting", "kv", "expected"),
    [
        (2, 40.0, 0.5, 5.0),  # 20 waiting per replica over 8: enough replicas for 8 each
        (2, 0.0, 1.9, 1.9 / 0.85),  # KV 0.95 per replica over 0.85: scale out
        (2, 40.0, 3.4, 5.0),  # both high: the larger need wins
        (2, 3.0, 0.2, 2.0),  # a small queue: never scale in, even with idle KV
        (3, 0.0, 0.9, 0.9 / 0.85),  # both low: scale in to what the KV needs
        (2, 0.0, 0.0, 0.0),  # idle
    ],
)
def test_llm_desired_replicas(
    num_replicas: int, waiting: float, kv: float, expected: float
) -> None:
    desired = desired_llm_replicas(
        num_replicas, waiting, kv, target_waiting_per_replica=8, target_kv_usage=0.85
    )
    assert desired == pytest.approx(expected)


@pytest.mark.parametrize(
    ("waiting", "kv", "current", "expected"),
    [
        ([20.0, 20.0], [0.3, 0.2], 2, 5),
        ([0.0, 0.0], [0.95, 0.95], 2, 3),
        ([0.0, 0.0], [0.85, 0.85], 2, 2),  # exactly at target: hold (no float creep)
        ([2.0, 1.0], [0.1, 0.1], 2, 2),
        ([0.0, 0.0, 0.0], [0.3, 0.3, 0.2], 3, 1),
        ([0.0, 0.0], [0.0, 0.0], 2, 1),
        ([200.0], [1.0], 1, 8),  # clamped to max_replicas
        ([9.0], [0.1], 2, 2),  # one replica not reported yet: its queue counts as empty
    ],
)
def test_llm_policy_decisions(
    waiting: list[float], kv: list[float], current: int, expected: int
) -> None:
    policy = EngineQueuePolicy(target_waiting_per_replica=8, target_kv_usage=0.85)
    ctx = _context({WAITING_SEQS: waiting, KV_USAGE: kv, RUNNING_SEQS: kv}, current=current)
    replicas, state = policy(ctx)
    assert replicas == expected
    assert state[WAITING_SEQS] == sum(waiting)


def test_llm_policy_holds_without_engine_metrics() -> None:
    policy = EngineQueuePolicy(target_waiting_per_replica=8, target_kv_usage=0.85)
    assert policy(_context({WAITING_SEQS: [50.0]}, current=1, target=2))[0] == 2
    ctx = _context({WAITING_SEQS: [0.0], KV_USAGE: [0.0]}, current=1, min_replicas=2)
    assert policy(ctx)[0] == 2


# ---- what Serve does with a policy: import path, kwargs, delays --------------------------------
@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        ("deployments.autoscaling:QueuedTilesPolicy", {"target_tiles_per_replica": 64.0}),
        (
            "deployments.autoscaling:EngineQueuePolicy",
            {"target_waiting_per_replica": 4.0, "target_kv_usage": 0.9},
        ),
    ],
)
def test_policy_loads_from_its_import_path(path: str, kwargs: dict[str, float]) -> None:
    """The controller unpickles the policy (by value) and builds the class with the kwargs."""
    spec = AutoscalingPolicy(policy_function=path, policy_kwargs=kwargs)
    policy = spec.get_policy()(**spec.policy_kwargs)
    replicas, _ = policy(
        _context({PENDING_TILES: [0.0], WAITING_SEQS: [0.0], KV_USAGE: [0.0]}, current=1)
    )
    assert replicas == 1


def test_delays_apply_once_around_the_policy() -> None:
    """Serve wraps every policy with its delay logic (autoscaling_state.py); the policy adds
    none of its own, so a change lands exactly one delay after it is first wanted."""
    delay_s = 0.3
    policy = _apply_autoscaling_config(QueuedTilesPolicy(target_tiles_per_replica=256))
    replicas, state = policy(_context({PENDING_TILES: [1000.0]}, current=1, delay_s=delay_s))
    assert replicas == 1  # wanted 4: waiting for upscale_delay_s
    assert state[PENDING_TILES] == 1000.0
    time.sleep(delay_s)
    ctx = _context({PENDING_TILES: [1000.0]}, current=1, delay_s=delay_s, policy_state=state)
    replicas, state = policy(ctx)
    assert replicas == 4
    ctx = _context({PENDING_TILES: [0.0] * 4}, current=4, delay_s=delay_s, policy_state=state)
    replicas, state = policy(ctx)
    assert replicas == 4  # wanted 1: waiting for downscale_delay_s
    time.sleep(delay_s)
    ctx = _context({PENDING_TILES: [0.0] * 4}, current=4, delay_s=delay_s, policy_state=state)
    assert policy(ctx)[0] == 1


# ---- the LLM replica's metrics (`record_autoscaling_stats`) -------------------------------------
# The vision pool's pending tiles need a real replica (`@serve.batch` asks for the replica
# context, which even Serve's local testing mode lacks): test_serve_configs.py checks them.
def _request(max_tokens: int) -> PreparedRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return PreparedRequest("req", [1, 2, 3], sampling)


async def _wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_llm_reports_waiting_running_and_kv(tiny_qwen2: Path) -> None:
    engine = EngineConfig(max_num_seqs=1, num_kv_blocks=64, block_size=16)
    args = ServeArgs(model_path=str(tiny_qwen2), dtype="float32", engine=engine)
    deployment = LLMDeployment(args)
    assert deployment.record_autoscaling_stats() == {
        WAITING_SEQS: 0.0,
        RUNNING_SEQS: 0.0,
        KV_USAGE: 0.0,
    }

    async def scenario() -> dict[str, float]:
        first = deployment.generate(_request(max_tokens=32), None, 0)
        second = deployment.generate(_request(max_tokens=32), None, 1)
        await anext(first)  # running, holding KV; max_num_seqs=1 keeps the other waiting
        waiting = asyncio.ensure_future(anext(second))
        await _wait_for(lambda: deployment.record_autoscaling_stats()[WAITING_SEQS] == 1)
        stats = deployment.record_autoscaling_stats()
        waiting.cancel()
        await first.aclose()
        # The aborts reach the engine's step thread at its next step boundary.
        await _wait_for(lambda: deployment.record_autoscaling_stats()[KV_USAGE] == 0.0)
        return stats

    stats = asyncio.run(scenario())
    assert stats[RUNNING_SEQS] == 1
    assert 0 < stats[KV_USAGE] < 1
    assert deployment.record_autoscaling_stats()[KV_USAGE] == 0.0
