"""Tests for deployments/stage.py: pipeline stage actors answer health pings while a long step
runs (a busy stage is not a dead stage), and a killed stage fails the ping at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.exceptions import RayActorError

from deployments.stage import STAGE_PING_TIMEOUT_S, StageActor, build_pipeline_engine, ping_stages
from internvl_core.config import EngineConfig, SamplingParams
from internvl_core.engine.batch import ScheduledBatch, StageOutput
from internvl_core.serve_args import ServeArgs

pytestmark = [pytest.mark.serve, pytest.mark.slow]

SLOW_STEP_S = 3.0  # each stage's execute: a long prefill on a big model
PING_BOUND_S = 1.0  # far below one step: the ping did not wait for it


class SlowStageActor(StageActor):
    """The real stage whose every step takes SLOW_STEP_S longer (the GIL released, as a GPU
    step that waits on the device)."""

    def execute(
        self, batch: ScheduledBatch, upstream: list[Any], sources: list[Any] | None = None
    ) -> StageOutput:
        time.sleep(SLOW_STEP_S)
        return super().execute(batch, upstream, sources)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # "local": never join a cluster another process recorded in /tmp/ray.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _timed_ping(stages: list[Any]) -> float:
    start = time.monotonic()
    asyncio.run(ping_stages(stages))
    return time.monotonic() - start


def test_busy_stage_answers_ping_and_killed_stage_fails_it(
    local_ray: None, tiny_qwen2: Path
) -> None:
    args = ServeArgs(
        model_path=str(tiny_qwen2),
        dtype="float32",
        engine=EngineConfig(pp_size=2, num_kv_blocks=64, max_model_len=256),
    )
    engine, stages = build_pipeline_engine(args, dtype=None, actor_cls=SlowStageActor)
    assert len(stages) == 2
    engine.add_request("busy", [1, 2, 3, 4, 5], SamplingParams(max_tokens=1))
    # One step: stage 0 then stage 1 each sleep SLOW_STEP_S inside execute.
    step = threading.Thread(target=engine.step)
    step.start()
    time.sleep(0.5)
    busy_s = _timed_ping(stages)
    middle_s = _timed_ping(stages)
    step.join(timeout=4 * SLOW_STEP_S + STAGE_PING_TIMEOUT_S)
    assert not step.is_alive()
    assert busy_s < PING_BOUND_S, f"ping waited {busy_s:.2f} s behind a step"
    assert middle_s < PING_BOUND_S, f"ping waited {middle_s:.2f} s behind a step"

    ray.kill(stages[1].actor, no_restart=True)
    start = time.monotonic()
    with pytest.raises(RayActorError):
        asyncio.run(ping_stages(stages))
    assert time.monotonic() - start < STAGE_PING_TIMEOUT_S
