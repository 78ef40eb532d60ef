"""A local HTTP media host for fetch tests.

It listens on 127.0.0.1 and 127.0.0.2 with one port, so a redirect can change the host and an
allow-list can tell them apart. It runs on its own thread and event loop, so it answers while a
test blocks on a request to the server under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from aiohttp import web

SHUTDOWN_S = 0.5


async def _start(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    first = web.TCPSite(runner, "127.0.0.1", 0, shutdown_timeout=SHUTDOWN_S)
    await first.start()
    port = first._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await web.TCPSite(runner, "127.0.0.2", port, shutdown_timeout=SHUTDOWN_S).start()
    return runner, port


@contextlib.contextmanager
def local_media_host(app: web.Application) -> Iterator[int]:
    """Serves `app` until the block ends; yields the port (the same on both addresses)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="media-host", daemon=True)
    thread.start()
    try:
        runner, port = asyncio.run_coroutine_threadsafe(_start(app), loop).result(10)
        try:
            yield port
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
