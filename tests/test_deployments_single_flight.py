"""SingleFlight: concurrent calls for one key share one task; results, errors and cancellation
reach exactly the callers they belong to, and nothing stays in flight afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from deployments.single_flight import SingleFlight


class Work:
    """A computation that counts its starts and finishes when released (or fails)."""

    def __init__(self) -> None:
        self.num_started = 0
        self.num_cancelled = 0
        self.release = asyncio.Event()
        self.error: Exception | None = None

    def start(self, value: str) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            self.num_started += 1
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.num_cancelled += 1
                raise
            if self.error is not None:
                raise self.error
            return value

        return run


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_concurrent_calls_for_one_key_run_once() -> None:
    async def scenario() -> None:
        flight: SingleFlight[str] = SingleFlight()
        work = Work()
        calls = [asyncio.ensure_future(flight.run("img", work.start(f"v{k}"))) for k in range(4)]
        other = asyncio.ensure_future(flight.run("other", work.start("w")))
        await _settle()
        assert (work.num_started, len(flight), flight.num_joined) == (2, 2, 3)
        work.release.set()
        assert await asyncio.gather(*calls) == ["v0"] * 4  # the first caller's computation
        assert await other == "w"
        await _settle()
        assert len(flight) == 0

    asyncio.run(scenario())


def test_error_reaches_every_waiter_and_the_next_call_retries() -> None:
    async def scenario() -> None:
        flight: SingleFlight[str] = SingleFlight()
        work = Work()
        work.error = RuntimeError("device lost")
        calls = [asyncio.ensure_future(flight.run("img", work.start("v"))) for _ in range(3)]
        await _settle()
        work.release.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [str(r) for r in results] == ["device lost"] * 3
        await _settle()
        assert len(flight) == 0
        work.error = None
        assert await flight.run("img", work.start("again")) == "again"
        assert work.num_started == 2

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_others_their_result() -> None:
    async def scenario() -> None:
        flight: SingleFlight[str] = SingleFlight()
        work = Work()
        first = asyncio.ensure_future(flight.run("img", work.start("v")))
        second = asyncio.ensure_future(flight.run("img", work.start("unused")))
        await _settle()
        first.cancel()  # the client that started the encode disconnects
        await _settle()
        assert first.cancelled() and not second.done()
        work.release.set()
        assert await second == "v"
        assert (work.num_started, work.num_cancelled) == (1, 0)

    asyncio.run(scenario())


def test_last_waiter_gone_cancels_the_task_and_a_new_call_starts_afresh() -> None:
    async def scenario() -> None:
        flight: SingleFlight[str] = SingleFlight()
        work = Work()
        calls = [asyncio.ensure_future(flight.run("img", work.start("v"))) for _ in range(2)]
        await _settle()
        for call in calls:
            call.cancel()
        # A caller arriving right after the last one left never joins the cancelled task.
        fresh = asyncio.ensure_future(flight.run("img", work.start("fresh")))
        await _settle()
        assert work.num_cancelled == 1 and all(call.cancelled() for call in calls)
        work.release.set()
        assert await fresh == "fresh"
        assert work.num_started == 2
        await _settle()
        assert len(flight) == 0

    asyncio.run(scenario())


def test_a_failed_task_nobody_awaits_is_not_reported_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        flight: SingleFlight[str] = SingleFlight()

        async def boom() -> str:
            raise ValueError("bad tiles")

        with pytest.raises(ValueError, match="bad tiles"):
            await flight.run("img", boom)
        await _settle()
        assert len(flight) == 0

    asyncio.run(scenario())
    assert "never retrieved" not in caplog.text
