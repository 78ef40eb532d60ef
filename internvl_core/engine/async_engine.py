"""AsyncLLMEngine: an asyncio front over LLMEngine with one background step loop.

`generate(...)` is an async iterator of RequestOutput per request. `step()` runs in a worker thread
so the event loop stays free; adds and aborts that arrive mid-step are applied right after it.
A consumer that stops iterating (closed generator, cancelled task) aborts its request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import torch

from internvl_core.config import SamplingParams
from internvl_core.engine.engine import LLMEngine
from internvl_core.engine.outputs import EngineStats, RequestOutput
from internvl_core.errors import EngineDeadError, InvalidRequestError

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    """Streams per request; the engine itself is only touched by the event-loop thread between
    steps and by the step thread during a step, never by both at once."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._deferred: list[Callable[[], None]] = []
        self._stepping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
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
                queue.put_nowait(e)

        finished = False
        try:
            self._run_between_steps(add)
            self._ensure_loop()
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
                self._run_between_steps(lambda: self.engine.abort(request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with finish_reason "abort"."""
        self._run_between_steps(lambda: self.engine.abort(request_id))

    async def shutdown(self) -> None:
        """Stop the step loop (after the current step)."""
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- the loop -------------------------------------------------------------------------
    def _run_between_steps(self, op: Callable[[], None]) -> None:
        """Run `op` on the engine now if no step is running, else right after the step."""
        if self._stepping:
            self._deferred.append(op)
        else:
            op()
        if self._wake is not None:
            self._wake.set()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    def _apply_deferred(self) -> None:
        ops, self._deferred = self._deferred, []
        for op in ops:
            op()

    async def _run_loop(self) -> None:
        assert self._wake is not None
        try:
            while True:
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._stepping = True
                step = asyncio.ensure_future(asyncio.to_thread(self.engine.step))
                try:
                    outputs = await asyncio.shield(step)
                except asyncio.CancelledError:
                    await asyncio.wait({step})  # the thread cannot be interrupted: let it end
                    raise
                finally:
                    self._stepping = False
                    self._apply_deferred()
                for out in outputs:
                    queue = self._streams.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                await asyncio.sleep(0)  # let consumers run before the next step
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("engine step loop died")
            self._dead = e
            error = EngineDeadError(f"engine loop died: {e!r}")
            for queue in self._streams.values():
                queue.put_nowait(error)
