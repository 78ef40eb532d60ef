"""PreprocessDeployment as a plain class (no Ray): `check_health` is cheap and fails when the
thumbnail pool that tiling waits on can no longer run work."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from deployments.preprocess import PreprocessDeployment
from internvl_core.preprocess.image import _resize_pool
from internvl_core.serve_args import ServeArgs


@pytest.fixture
def deployment(tiny_qwen2: Path) -> PreprocessDeployment:
    return PreprocessDeployment(ServeArgs(model_path=str(tiny_qwen2), dtype="float32"))


def test_check_health_passes_and_is_cheap(deployment: PreprocessDeployment) -> None:
    async def probe() -> float:
        await deployment.check_health()  # the pool's threads start on first use
        start = time.perf_counter()
        for _ in range(20):
            await deployment.check_health()
        return (time.perf_counter() - start) / 20

    assert asyncio.run(probe()) < 0.05
    assert asyncio.run(deployment.health()) is True


def test_check_health_fails_when_the_thumbnail_pool_is_gone(
    deployment: PreprocessDeployment,
) -> None:
    _resize_pool().shutdown()  # as at interpreter exit, or after a fatal error in the pool
    try:
        with pytest.raises(RuntimeError, match="thumbnail pool is not running"):
            asyncio.run(deployment.check_health())
    finally:
        _resize_pool.cache_clear()  # a fresh pool for the rest of the session
    asyncio.run(deployment.check_health())
