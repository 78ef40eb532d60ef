"""The n choice streams of one chat request, as the ingress reads them from the LLM replicas.

In: one async iterator of GenerationEvent dicts per choice. Out: each choice's first event with
the time it arrived (errors surface before any header is sent), then the events of all choices
interleaved as they arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from deployments.events import GenerationEvent


async def first_event(stream: AsyncIterator[Any]) -> tuple[GenerationEvent, float]:
    """The stream's first event and its arrival time (`time.perf_counter`)."""
    try:
        event = GenerationEvent.from_wire(await stream.__anext__())
    except StopAsyncIteration as e:
        raise RuntimeError("LLM stream ended without an event") from e
    return event, time.perf_counter()


async def first_events(streams: list[AsyncIterator[Any]]) -> list[tuple[GenerationEvent, float]]:
    """Every choice's first event, awaited together so each arrival time is its own."""
    if len(streams) == 1:
        return [await first_event(streams[0])]
    tasks = [asyncio.ensure_future(first_event(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


async def merge(
    streams: list[AsyncIterator[Any]], first: list[GenerationEvent]
) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Interleave the n choice streams as events arrive; first events go out first."""
    for i, event in enumerate(first):
        yield i, event
    pending = [i for i, event in enumerate(first) if not event.finished]
    if len(pending) == 1:
        async for raw in streams[pending[0]]:
            yield pending[0], GenerationEvent.from_wire(raw)
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for raw in streams[i]:
                await queue.put((i, raw))
            await queue.put((i, None))
        except Exception as e:  # forwarded to the consumer below
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in pending]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, GenerationEvent.from_wire(item)
    finally:
        for task in tasks:
            task.cancel()
