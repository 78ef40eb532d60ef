"""One computation in flight per key: concurrent callers with the same key await the same task.

In: a key and a coroutine factory. Out: the task's result (or its exception) for every caller.
The vision pool keys it by image content hash, so identical images in flight are encoded once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class _Flight(Generic[T]):
    task: asyncio.Future[T]
    num_waiters: int = 0


class SingleFlight(Generic[T]):
    """Shares one task per key among its callers.

    A caller's cancellation cancels only its own wait; the task is cancelled when its last
    waiter leaves (nobody wants the result). A task's exception reaches every waiter, and a
    finished, failed or cancelled task is forgotten at once, so the next call starts afresh.
    """

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self.num_started = 0
        self.num_joined = 0  # calls that found their key in flight

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: str, start: Callable[[], Awaitable[T]]) -> T:
        """`await start()`, unless a task for `key` is in flight: then await that one."""
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight(asyncio.ensure_future(start()))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda task: self._finished(key, flight, task))
            self.num_started += 1
        else:
            self.num_joined += 1
        flight.num_waiters += 1
        try:
            # shield: cancelling this caller must not cancel the task others await
            return await asyncio.shield(flight.task)
        finally:
            flight.num_waiters -= 1
            if flight.num_waiters == 0 and not flight.task.done():
                self._forget(key, flight)  # a later caller starts anew, never joins a cancelled one
                flight.task.cancel()

    def _finished(self, key: str, flight: _Flight[T], task: asyncio.Future[T]) -> None:
        self._forget(key, flight)
        if not task.cancelled() and task.exception() is not None:
            # every waiter got it through shield(); this marks it retrieved for asyncio
            logger.debug("in-flight task for %s failed: %r", key, task.exception())

    def _forget(self, key: str, flight: _Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
