"""AsyncLLMEngine: an asyncio front over LLMEngine with one dedicated step thread.

`generate(...)` is an async iterator of RequestOutput per request. The step thread runs
`LLMEngine.step()` back to back while there is work, so the next step never waits for the event
loop to get round to starting it (a busy replica loop, e.g. Serve streaming results, used to
delay every step). Adds and aborts are queued by the loop and applied by the step thread between
steps; outputs are handed to the loop with `call_soon_threadsafe`. A consumer that stops
iterating (closed generator, cancelled task) aborts its request at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable

import torch

from internvl_core.config import SamplingParams
from internvl_core.engine.engine import LLMEngine
from internvl_core.engine.outputs import EngineStats, RequestOutput
from internvl_core.errors import EngineDeadError, InvalidRequestError

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30.0


class AsyncLLMEngine:
    """Streams per request; the engine is only touched by the step thread (steps, adds, aborts),
    except `check_request` and the stats counters, which the loop reads."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._ops: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: BaseException | None = None

    # ---- public API -----------------------------------------------------------------------
    def check_health(self) -> None:
        """Raise EngineDeadError if the step loop died."""
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}") from self._dead

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        image_embeds: torch.Tensor | None = None,
        image_hashes: list[str] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs until one has `finished`; errors at admission raise here."""
        self.check_health()
        if request_id in self._streams:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", param="id")
        rows = 0 if image_embeds is None else image_embeds.shape[0]
        self.engine.check_request(prompt_token_ids, params, num_image_rows=rows)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue

        def add() -> None:
            try:
                self.engine.add_request(
                    request_id,
                    prompt_token_ids,
                    params,
                    image_embeds=image_embeds,
                    image_hashes=image_hashes,
                )
            except Exception as e:  # reported to this request's consumer, not the loop
                self._to_loop(queue.put_nowait, e)

        finished = False
        try:
            self._ensure_thread()
            self._submit(add)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(lambda: self.engine.abort(request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with finish_reason "abort"."""
        self._submit(lambda: self.engine.abort(request_id))

    async def shutdown(self) -> None:
        """Stop the step thread (after the current step)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop = True
            self._wake.set()
            await asyncio.to_thread(thread.join, JOIN_TIMEOUT_S)

    # ---- the step thread ------------------------------------------------------------------
    def _submit(self, op: Callable[[], None]) -> None:
        """Queue `op` for the step thread, which runs it before its next step."""
        self._ops.append(op)
        self._wake.set()

    def _to_loop(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        # A closed loop raises RuntimeError: nobody is left to read these outputs.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    def _ensure_thread(self) -> None:
        """Start the step thread for the running loop (again, if an earlier loop went away)."""
        self.check_health()  # a dead engine is not restarted
        loop = asyncio.get_running_loop()
        if self._thread is not None and self._thread.is_alive() and self._loop is loop:
            return
        if self._thread is not None:  # bound to a loop that is gone: let it end
            self._stop = True
            self._wake.set()
            self._thread.join(JOIN_TIMEOUT_S)
        self._loop, self._stop = loop, False
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop:
                while self._ops:
                    self._ops.popleft()()
                if not self.engine.has_unfinished():
                    self._wake.wait()
                    self._wake.clear()  # ops queued after this set it again: none is lost
                    continue
                outputs = self.engine.step()
                if outputs:
                    self._to_loop(self._deliver, outputs)
        except Exception as e:
            logger.exception("engine step loop died")
            self._dead = e
            self._to_loop(self._fail_streams, e)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _fail_streams(self, cause: BaseException) -> None:
        error = EngineDeadError(f"engine loop died: {cause!r}")
        for queue in self._streams.values():
            queue.put_nowait(error)
