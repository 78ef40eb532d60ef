"""`gather_or_cancel`: asyncio.gather whose first failure cancels the other awaitables.

In: awaitables (media loads, encoder chunks). Out: their results in order, or the first error
after every other one was cancelled and awaited (nothing left running or queued).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def gather_or_cancel(awaitables: list[Awaitable[T]]) -> list[T]:
    """gather(), but the first failure cancels the rest instead of leaving them running (media
    fetches holding connections, encodes holding batch slots) after the caller gave up."""
    tasks = [asyncio.ensure_future(item) for item in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
