"""LLMEngine: requests in (prompt ids, image embeddings, SamplingParams), token/text deltas out.

Each `step()` first plans and submits batches until `max_in_flight` are in the Pipeline, then
collects the oldest one's sampled tokens, detokenizes them, applies the stop rules and frees
finished requests. With async scheduling (the default) `max_in_flight` is 2 * pp_size: each of the
pp_size micro-batches is queued again (as a run-ahead step whose input tokens stage 0 takes from
the last stage's samples) before the host has read its previous tokens, so no stage waits for
the host. The host reads results one step behind the device; a request that stops at step N may
have run one more, discarded step (its blocks are freed when the stop is seen).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from internvl_core.config import EngineConfig, LLMArchitecture, ModelArchitecture, SamplingParams
from internvl_core.engine.block_manager import BlockManager
from internvl_core.engine.detokenizer import IncrementalDetokenizer, TokenDecoder
from internvl_core.engine.output_processor import (
    OutputProcessor,
    RequestState,
    StepTokens,
    make_output,
)
from internvl_core.engine.outputs import (
    CompletedOutput,
    EngineStats,
    OutputCollector,
    RequestOutput,
)
from internvl_core.engine.pipeline import (
    PendingBatch,
    Pipeline,
    StageWorker,
    build_pipeline,
)
from internvl_core.engine.sampler import SamplerOutput
from internvl_core.engine.scheduler import Scheduler
from internvl_core.engine.sequence import Request, Sequence, SequenceStatus
from internvl_core.engine.stop import StopChecker, TokenStops
from internvl_core.errors import ContextLengthError, EngineOverloadedError, InvalidRequestError
from internvl_core.grammar import check_structured_output
from internvl_core.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# The template separator is the original chat()'s only stop id (spec section 3).
TEMPLATE_STOP_TOKENS = {
    "Hermes-2": "<|im_end|>",
    "internlm2-chat": "<|im_end|>",
    "phi3-chat": "<|end|>",
}


class LLMEngine:
    """Continuous-batching engine over a (possibly multi-stage) pipeline; no Ray in here."""

    def __init__(
        self,
        pipeline: Pipeline,
        tokenizer: TokenDecoder | None,
        config: EngineConfig,
        *,
        eos_token_ids: tuple[int, ...],
        image_token_id: int | None,
        model_arch: LLMArchitecture,
        async_scheduling: bool = True,
    ) -> None:
        """`tokenizer` None: no text (deltas stay empty) and stop strings are refused.
        `async_scheduling`: plan each (micro-)batch's next step while it runs (else pp_size
        batches in flight, each planned once the host has its tokens)."""
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.image_token_id = image_token_id
        self.model_arch = model_arch
        self.max_model_len = config.max_model_len_for(model_arch)
        if self.max_model_len < config.max_model_len:
            logger.info("max_model_len capped to max_position_embeddings %d", self.max_model_len)
        self.num_kv_blocks = pipeline.init_kv_cache(config)
        self.block_manager = BlockManager(
            self.num_kv_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        pp_size = pipeline.pp_size
        self.max_in_flight = 2 * pp_size if async_scheduling else pp_size
        # PP > 1: when fewer than pp_size batches are left in flight after a fetch (nothing ran
        # ahead: penalties, min_tokens, last tokens), the returned micro-batch's sequences go back
        # to stage 0 before the output side runs, so stage 0 does not idle through it.
        self._refill_after_fetch = pp_size if pp_size > 1 else 0
        self.scheduler = Scheduler(config, self.block_manager, async_decode=async_scheduling)
        self._states: dict[str, RequestState] = {}
        self._token_stops = TokenStops(capacity=config.max_num_seqs)
        self.output_processor = OutputProcessor(self._states, self._finish)
        self._in_flight: deque[PendingBatch] = deque()
        self._aborted_outputs: list[RequestOutput] = []
        self._ids = itertools.count()
        scaling = model_arch.rope_scaling
        self._long_rope_threshold = (
            scaling.original_max_position_embeddings
            if scaling is not None and scaling.type == "longrope"
            else None
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: EngineConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quantization: Literal["8bit", "4bit"] | None = None,
        eos_token_ids: tuple[int, ...] | None = None,
        stage_factory: Callable[[int, int, int], StageWorker] | None = None,
        keep_special_tokens: tuple[str, ...] = (),
        async_scheduling: bool = True,
    ) -> LLMEngine:
        """Build `config.pp_size` stages (layers split evenly) from an original folder.

        Stages are in-process unless `stage_factory(stage_index, start_layer, end_layer)` builds
        them (the Serve LLM replica passes one that creates Ray actors on its bundles).
        eos defaults to the template separator id looked up in the checkpoint's tokenizer.
        `keep_special_tokens` survive skip_special_tokens in the text (the demo's grounding tags).
        """
        arch = ModelArchitecture.from_checkpoint(path)
        tokenizer = load_tokenizer(path)
        if keep_special_tokens:
            tokenizer = tokenizer.with_kept_special_tokens(keep_special_tokens)
        pipeline = build_pipeline(
            path,
            config,
            arch=arch.llm,
            dtype=dtype,
            device=device,
            quantization=quantization,
            stage_factory=stage_factory,
        )
        if eos_token_ids is None:
            sep_id = tokenizer.token_to_id(TEMPLATE_STOP_TOKENS[arch.template])
            eos_token_ids = (sep_id,) if sep_id is not None else ()
        return cls(
            pipeline,
            tokenizer,
            config,
            eos_token_ids=eos_token_ids,
            image_token_id=tokenizer.token_to_id(IMG_CONTEXT_TOKEN),
            model_arch=arch.llm,
            async_scheduling=async_scheduling,
        )

    # ---- requests -------------------------------------------------------------------------
    def check_request(
        self, prompt_token_ids: list[int], params: SamplingParams, *, num_image_rows: int = 0
    ) -> None:
        """Refuse what can never run (no state is touched; safe from any thread)."""
        num_prompt, max_tokens = len(prompt_token_ids), params.max_tokens
        total = num_prompt + max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
                f"prompt has {num_prompt} tokens and max_tokens is {max_tokens}: {total} > "
                f"max_model_len {self.max_model_len}",
                param="max_tokens",
            )
        need = self.block_manager.num_blocks_for(total)
        if need > self.num_kv_blocks:
            raise ContextLengthError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) needs {need} KV blocks "
                f"of {self.config.block_size} tokens; the KV pool has {self.num_kv_blocks}",
                param="max_tokens",
            )
        if not self.config.enable_chunked_prefill and total > self.config.max_num_batched_tokens:
            raise ContextLengthError(
                f"prompt + max_tokens is {total} tokens; without chunked prefill it must fit "
                f"max_num_batched_tokens {self.config.max_num_batched_tokens}",
                param="max_tokens",
            )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer", param="stop")
        if num_image_rows and self.image_token_id is None:
            raise InvalidRequestError("image_embeds given but no <IMG_CONTEXT> id", param="image")
        # Structured outputs: a schema xgrammar refuses is a 400 here, before any model work.
        check_structured_output(params)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        image_embeds: torch.Tensor | None = None,
        image_hashes: list[str] | None = None,
    ) -> None:
        """Queue a request. `image_embeds` [num_image_tokens, D]: rows in `<IMG_CONTEXT>` order;
        `image_hashes`: one content hash per image run (for prefix caching)."""
        if request_id in self._states:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", param="id")
        if self.scheduler.num_waiting >= self.config.max_waiting_requests:
            raise EngineOverloadedError(
                f"{self.scheduler.num_waiting} requests are waiting; max_waiting_requests is "
                f"{self.config.max_waiting_requests}"
            )
        rows = 0 if image_embeds is None else image_embeds.shape[0]
        self.check_request(prompt_token_ids, params, num_image_rows=rows)
        if image_embeds is not None and image_embeds.shape[-1] != self.model_arch.hidden_size:
            raise InvalidRequestError(
                f"image_embeds width is {image_embeds.shape[-1]}; the LLM hidden size is "
                f"{self.model_arch.hidden_size}",
                param="image_embeds",
            )
        request = Request.create(
            request_id,
            prompt_token_ids,
            params,
            image_token_id=self.image_token_id,
            image_embeds=image_embeds,
            image_hashes=image_hashes,
            eos_token_ids=self.eos_token_ids,
        )
        seq = Sequence(request, self.config.block_size, hash_salt=self._hash_salt(request))
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
            )
        stop = StopChecker(params, eos_token_ids=self.eos_token_ids)
        seq.stop_row = self._token_stops.add(params, eos_token_ids=self.eos_token_ids)
        self._states[request_id] = RequestState(seq, stop, detokenizer)
        self.scheduler.add(seq)

    def _hash_salt(self, request: Request) -> str:
        """Phi-3 longrope: a prompt past the switch length gives every token different K/V."""
        threshold = self._long_rope_threshold
        if threshold is not None and len(request.prompt_token_ids) > threshold:
            return "longrope"
        return ""

    def abort(self, request_id: str) -> None:
        """Stop a request now: its blocks are freed at once; the next step reports "abort"."""
        self._finish_early(request_id, SequenceStatus.FINISHED_ABORTED)

    def fail(self, request_id: str) -> None:
        """End a request with finish reason "error" (e.g. its consumer raised)."""
        self._finish_early(request_id, SequenceStatus.FINISHED_ERROR)

    def _finish_early(self, request_id: str, status: SequenceStatus) -> None:
        state = self._states.pop(request_id, None)
        if state is None:
            return
        seq = state.seq
        self._finish(seq, status)
        self._aborted_outputs.append(make_output(state, [], "", None, reason=status.value))

    def has_unfinished(self) -> bool:
        return bool(self._states or self._aborted_outputs or self._in_flight)

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step of the loop, then the output side on its tokens (text, stop strings)."""
        outputs, self._aborted_outputs = self._aborted_outputs, []
        outputs.extend(self.output_processor.process(self.step_tokens()))
        return outputs

    def step_tokens(self) -> StepTokens:
        """The step loop without the output side: plan and submit until `max_in_flight` batches
        are in flight, then read back the oldest; requests ending by a stop id or length are
        freed here (one vectorised check over the batch). At PP > 1 the pipeline is refilled to
        pp_size batches at once (before the output side). Aborted requests' outputs wait for
        `step`."""
        self._submit_ready()
        if not self._in_flight:
            return StepTokens()
        pending = self._in_flight.popleft()
        sampled = self.pipeline.fetch(pending)
        token_ids = sampled.token_ids  # the host reads the sampled ids back here
        grown = self.scheduler.update(pending.batch.batch_id, token_ids)
        num = len(grown)
        if num != len(token_ids):  # some finished while in flight: their tokens are dropped
            token_ids = [seq.token_ids[-1] for seq in grown]
        if num:
            rows = np.fromiter((seq.stop_row for seq in grown), dtype=np.int64, count=num)  # [N]
            num_outputs = np.fromiter(
                (len(seq.output_token_ids) for seq in grown), dtype=np.int64, count=num
            )  # [N]
            last_ids = np.array(token_ids, dtype=np.int64)  # [N]
            finish = self.scheduler.finish
            for index, status in self._token_stops.finished(rows, last_ids, num_outputs):
                finish(grown[index], status)
        step = StepTokens(grown, token_ids)
        if sampled.logprobs is not None or sampled.top_logprobs is not None:
            _attach_logprobs(step, pending, sampled)
        if self._refill_after_fetch:
            self._submit_ready(self._refill_after_fetch)
        return step

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End a request for good (output side or abort): blocks and its stop row are freed."""
        self.scheduler.finish(seq, status)
        if seq.stop_row >= 0:
            self._token_stops.free(seq.stop_row)
            seq.stop_row = -1

    def _submit_ready(self, limit: int | None = None) -> None:
        """Plan and submit batches until `limit` (default `max_in_flight`) are in the pipeline
        or none can run."""
        limit = self.max_in_flight if limit is None else limit
        in_flight = self._in_flight
        while len(in_flight) < limit:
            batch = self.scheduler.schedule()
            if batch is None:
                break
            sources: list[PendingBatch] = []
            if batch.deferred_source_batch_ids:
                by_id = {pending.batch.batch_id: pending for pending in in_flight}
                sources = [by_id[batch_id] for batch_id in batch.deferred_source_batch_ids]
            in_flight.append(self.pipeline.submit(batch, sources))

    # ---- offline convenience ----------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        *,
        image_embeds: list[torch.Tensor | None] | None = None,
        image_hashes: list[list[str] | None] | None = None,
    ) -> list[CompletedOutput]:
        """Run `prompts` to completion together; results in input order.

        Steps the engine until these requests finish; outputs of other requests added through
        `add_request` meanwhile are not returned here.
        """
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        embeds = image_embeds or [None] * len(prompts)
        hashes = image_hashes or [None] * len(prompts)
        if not len(params_list) == len(embeds) == len(hashes) == len(prompts):
            raise InvalidRequestError("params, image_embeds and prompts differ in length")
        ids = [f"generate-{next(self._ids)}" for _ in prompts]
        results = {rid: OutputCollector() for rid in ids}
        for rid, prompt, p, emb, h in zip(ids, prompts, params_list, embeds, hashes, strict=True):
            self.add_request(rid, prompt, p, image_embeds=emb, image_hashes=h)
        pending = set(ids)
        while pending:
            for out in self.step():
                collector = results.get(out.request_id)
                if collector is not None:
                    collector.add(out)
                    if out.finished:
                        pending.discard(out.request_id)
        while self._in_flight and not self._states:  # a finished request's run-ahead step
            self.step()
        return [results[rid].complete(rid) for rid in ids]

    @property
    def stats(self) -> EngineStats:
        manager = self.block_manager
        return EngineStats(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            num_in_flight_batches=len(self._in_flight),
            kv_blocks_total=manager.num_blocks,
            kv_blocks_free=manager.num_free_blocks,
            kv_block_size=manager.block_size,
            prefix_cache_hit_rate=manager.prefix_cache_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queried_tokens=manager.num_queried_blocks * manager.block_size,
            prefix_cache_hit_tokens=manager.num_hit_blocks * manager.block_size,
        )


def _attach_logprobs(step: StepTokens, pending: PendingBatch, sampled: SamplerOutput) -> None:
    rows = {req.request_id: i for i, req in enumerate(pending.batch.sampling)}
    logprobs: list[list[float] | None] = []
    top_logprobs: list[list[list[tuple[int, float]]] | None] = []
    for seq in step.seqs:
        row = rows[seq.request_id]
        params = seq.request.params
        logprobs.append([sampled.logprobs[row]] if params.logprobs and sampled.logprobs else None)
        top = params.top_logprobs and sampled.top_logprobs is not None
        top_logprobs.append([sampled.top_logprobs[row]] if top else None)  # type: ignore[index]
    step.logprobs, step.top_logprobs = logprobs, top_logprobs
