"""LLM replica: one AsyncLLMEngine (scheduler + paged KV) over pp_size pipeline stages.

In: a text-only PreparedRequest (by value) or the vision pool's EncodedRequest (by reference), and
the choice index. Out: a stream of GenerationEvent dicts. A dead stage or engine loop fails
`check_health`, so Serve replaces the replica; a cancelled caller aborts the sequence and frees
its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from deployments.autoscaling import KV_USAGE, RUNNING_SEQS, WAITING_SEQS
from deployments.client_errors import log_client_errors_in_one_line
from deployments.device import resolve_device
from deployments.events import EmbeddingPayload, EncodedRequest, GenerationEvent
from deployments.metrics import EngineMetrics, TokenTimer
from deployments.replica_loss import leave_when_engine_dies
from deployments.stage import RayStageWorker, build_pipeline_engine, kept_tokens, ping_stages
from internvl_core.engine import AsyncLLMEngine, LLMEngine
from internvl_core.preprocess.request import PreparedRequest
from internvl_core.serve_args import ServeArgs

logger = logging.getLogger(__name__)

GAUGE_PERIOD_S = 1.0  # engine gauges are refreshed this often, busy or idle


class LLMDeployment:
    """Owns the engine; stage workers are in-process (PP=1) or actors on the replica's bundles."""

    def __init__(self, args: ServeArgs) -> None:
        log_client_errors_in_one_line()  # e.g. a prompt over the KV pool: one line, no traceback
        device, dtype = resolve_device(args.dtype)
        self.args = args
        self.stages: list[RayStageWorker] = []
        if args.engine.pp_size == 1:
            engine = LLMEngine.from_checkpoint(
                args.model_path,
                args.engine,
                dtype=dtype,
                device=device,
                quantization=args.quantization,
                keep_special_tokens=kept_tokens(args),
            )
        else:
            engine, self.stages = build_pipeline_engine(args, dtype=dtype)
        self.engine = AsyncLLMEngine(engine)
        self.metrics = EngineMetrics()
        self._gauge_task: asyncio.Task[None] | None = None
        self._start_gauges()
        logger.info("LLM replica ready: %s, pp_size=%d", args.model_name, args.engine.pp_size)

    async def generate(
        self,
        prepared: PreparedRequest | EncodedRequest,
        embeds: EmbeddingPayload | None = None,
        choice_index: int = 0,
        stream_interval_s: float = 0.0,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream one choice; the generator's cancellation aborts the engine request.

        The first event goes out at once (time to first token); later steps are coalesced into
        one event per `stream_interval_s` (0 = every step; a non-streaming caller passes a large
        value and gets the first and the final event only), which cuts per-token Ray overhead.
        """
        if isinstance(prepared, EncodedRequest):  # a media request, from the vision pool
            prepared, embeds = prepared.prepared, prepared.embeds
        params = prepared.sampling
        if choice_index and params.seed is not None:
            params = params.model_copy(update={"seed": (params.seed + choice_index) % 2**64})
        rows = embeds.to_tensor() if embeds is not None else None
        hashes = [image.content_hash for image in prepared.images] or None
        stream = self.engine.generate(
            f"{prepared.request_id}-{choice_index}",
            prepared.prompt_token_ids,
            params,
            image_embeds=rows,
            image_hashes=hashes,
        )
        stream = leave_when_engine_dies(stream)
        self._start_gauges()
        timer = TokenTimer()
        pending: list[GenerationEvent] = []
        last_sent = 0.0
        async for out in stream:
            now = time.monotonic()
            self.metrics.output(timer, now, len(out.token_ids), out.queue_time_s)
            pending.append(self._event(out))
            if out.finished or not last_sent or now - last_sent >= stream_interval_s:
                yield merge_events(pending).to_wire()
                pending, last_sent = [], now

    def _event(self, out: Any) -> GenerationEvent:
        return GenerationEvent(
            text=out.text_delta,
            token_ids=list(out.token_ids),
            finish_reason=out.finish_reason,
            num_prompt_tokens=out.num_prompt_tokens,
            num_output_tokens=out.num_output_tokens,
            num_cached_tokens=out.num_cached_tokens,
            logprobs=self._logprobs(out),
        )

    def _token(self, token_id: int) -> dict[str, Any]:
        text = self.engine.engine.tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "bytes": list(text.encode())}

    def _logprobs(self, out: Any) -> list[dict[str, Any]] | None:
        """OpenAI `logprobs.content` items for this step's new tokens."""
        if out.logprobs is None:
            return None
        items = []
        for i, (token_id, logprob) in enumerate(zip(out.token_ids, out.logprobs, strict=False)):
            top = out.top_logprobs[i] if out.top_logprobs else []
            items.append(
                {
                    **self._token(token_id),
                    "logprob": logprob,
                    "top_logprobs": [{**self._token(t), "logprob": lp} for t, lp in top],
                }
            )
        return items

    def _start_gauges(self) -> None:
        """Start the gauge refresh on the replica's loop (Serve runs `__init__` on it; a plain
        construction outside a loop starts it with the first `generate`)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = self._gauge_task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._gauge_task = loop.create_task(self._refresh_gauges())

    async def _refresh_gauges(self) -> None:
        while True:
            try:
                self.metrics.record(self.engine.stats, time.monotonic())
            except Exception:  # a metrics failure must not stop the refresh
                logger.exception("engine gauge refresh failed")
            await asyncio.sleep(GAUGE_PERIOD_S)

    def stats(self) -> dict[str, Any]:
        """Engine counters (tests check KV blocks are all free after a disconnect)."""
        stats = self.engine.stats
        return {
            "num_waiting": stats.num_waiting,
            "num_running": stats.num_running,
            "kv_blocks_total": stats.kv_blocks_total,
            "kv_blocks_free": stats.kv_blocks_free,
            "prefix_cache_hit_rate": stats.prefix_cache_hit_rate,
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve polls this for the engine_queue policy (deployments.autoscaling)."""
        stats = self.engine.stats
        used = stats.kv_blocks_total - stats.kv_blocks_free
        return {
            WAITING_SEQS: float(stats.num_waiting),
            RUNNING_SEQS: float(stats.num_running),
            KV_USAGE: used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0,
        }

    async def health(self) -> bool:
        await self.check_health()
        return True

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes the replica unhealthy (replaced).

        Stages are pinged first: a dead stage actor raises ActorDiedError, which Serve treats as
        a crash at once, whereas the engine's own error (its loop dies with the stage) would
        need several failed checks in a row. A stage busy with a long step still answers (its
        ping has its own thread), and the engine steps on its own thread, so nothing here waits
        for a step.
        """
        await ping_stages(self.stages)
        self.engine.check_health()


def merge_events(events: list[GenerationEvent]) -> GenerationEvent:
    """Several consecutive steps of one choice as one event (texts and tokens concatenated)."""
    if len(events) == 1:
        return events[0]
    last = events[-1]
    logprobs = [item for e in events for item in (e.logprobs or [])]
    return GenerationEvent(
        text="".join(e.text for e in events),
        token_ids=[t for e in events for t in e.token_ids],
        finish_reason=last.finish_reason,
        num_prompt_tokens=last.num_prompt_tokens,
        num_output_tokens=last.num_output_tokens,
        num_cached_tokens=last.num_cached_tokens,
        logprobs=logprobs if any(e.logprobs is not None for e in events) else None,
    )
