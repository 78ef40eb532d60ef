"""gather_or_cancel: results in order; the first failure cancels and awaits the others."""

from __future__ import annotations

import asyncio

import pytest

from internvl_core.gather import gather_or_cancel


def test_results_come_in_order() -> None:
    async def value(x: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return x

    out = asyncio.run(gather_or_cancel([value(1, 0.02), value(2, 0.0), value(3, 0.01)]))
    assert out == [1, 2, 3]


def test_first_failure_cancels_the_rest() -> None:
    cancelled: list[int] = []

    async def slow(i: int) -> int:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    async def boom() -> int:
        await asyncio.sleep(0.01)
        raise ValueError("refused")

    async def run() -> None:
        with pytest.raises(ValueError, match="refused"):
            await gather_or_cancel([slow(0), boom(), slow(2)])
        assert sorted(cancelled) == [0, 2]  # cancelled and awaited before the error surfaced

    asyncio.run(run())
