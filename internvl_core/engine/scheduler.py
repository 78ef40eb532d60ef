# Over 400 lines: planning, row building and update share the in-flight counters (issue 12).
"""Continuous batching: waiting/running queues -> one `ScheduledBatch` per step.

FCFS: running sequences first (decodes and unfinished prefill chunks, oldest first), then new
admissions while the token budget, `max_num_seqs` and free KV blocks allow. When blocks run out the
newest running sequence is preempted by recompute (blocks freed, back to the front of the queue).

With `async_decode` a sequence whose sample is still in flight is planned again at once: its next
token is a placeholder the stage fills from the previous batch's sampled ids on the device (vLLM
V1's async scheduling). With `pp_size` > 1 each batch takes its share of the runnable tokens, so
the `pp_size` micro-batches in flight stay near-equal.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from internvl_core.config import EngineConfig, SamplingParams
from internvl_core.engine.batch import SamplingRequest, ScheduledBatch
from internvl_core.engine.block_manager import BlockManager
from internvl_core.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

# A tuple, not a set: `in` compares by identity in C (Enum.__hash__ is Python code).
_FINISHED = tuple(s for s in SequenceStatus if s.is_finished)


@dataclass(slots=True)
class _Rows:
    """One batch as it is planned, row by row (sequence s owns rows in the order planned); kept
    while the batch is in flight, for `update`."""

    batch_id: int
    seqs: list[Sequence] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)  # [num_tokens]
    query_lens: list[int] = field(default_factory=list)  # [num_seqs]
    context_lens: list[int] = field(default_factory=list)  # [num_seqs]
    sample_flags: list[bool] = field(default_factory=list)  # [num_seqs]
    sampling: list[SamplingRequest] = field(default_factory=list)  # [num_samples]
    deferred_rows: list[int] = field(default_factory=list)  # [num_deferred]
    deferred_sources: list[int] = field(default_factory=list)  # [num_deferred]
    image_indices: list[int] = field(default_factory=list)  # [num_image_rows]
    image_parts: list[torch.Tensor] = field(default_factory=list)  # each [rows, D]


class Scheduler:
    """Plans every step; the only producer of ScheduledBatch and the owner of block tables."""

    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, *, async_decode: bool = False
    ) -> None:
        """`async_decode`: plan sequences again while their sample is in flight (stage 0 must be
        the sampling stage, i.e. pp_size 1, to fill the placeholder tokens)."""
        self.config = config
        self.async_decode = async_decode
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._next_batch_id = 0
        self._in_flight: dict[int, _Rows] = {}
        self._finished_ids: list[str] = []
        self.num_preemptions = 0
        self.last_preempted: list[str] = []  # request ids preempted by the latest schedule()
        self._sampling_requests: dict[str, SamplingRequest] = {}

    # ---- queues ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        # Output counts n with run_ahead_from <= n < run_ahead_until may step on an in-flight
        # sample: not its last token, and no min_tokens mask or penalty reads the history.
        params = seq.request.params
        seq.run_ahead_from = params.max_tokens if _reads_history(params) else params.min_tokens
        seq.run_ahead_until = params.max_tokens - 1
        self.waiting.append(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._in_flight)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End a sequence (stop, length, abort, error): free its blocks at once.

        Safe while a batch holding it is in flight: stages run batches in order, so any later
        owner of these blocks writes its K/V after the in-flight batch has written its own.
        """
        assert status.is_finished
        if seq.status.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.block_table = []
        seq.status = status
        self._sampling_requests.pop(seq.request_id, None)
        self._finished_ids.append(seq.request_id)

    # ---- planning -------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """Plan the next step, or None if nothing can run now (all in flight or no work)."""
        self.last_preempted = []
        budget = self._token_budget()
        rows = _Rows(self._next_batch_id)
        budget = self._schedule_running(rows, budget)
        if not self.last_preempted:
            self._schedule_waiting(rows, budget)
        if not rows.seqs:
            return None
        batch = self._build_batch(rows)
        self._in_flight[batch.batch_id] = rows
        return batch

    def _token_budget(self) -> int:
        """With pp_size > 1, this micro-batch's share of the next round's tokens, so that the
        pp_size micro-batches in flight stay near-equal: each sequence in flight will need about
        one token, each runnable one its next chunk, each waiting one its prompt. A micro-batch
        that comes back larger than the share leaves its tail to the next one."""
        budget = self.config.max_num_batched_tokens
        pp_size = self.config.pp_size
        if pp_size == 1:
            return budget
        running = self.running
        # On the critical path between a micro-batch's return and its successor's start.
        chunks = [len(s.token_ids) - s.num_computed_tokens for s in running if not s.num_in_flight]
        num_in_flight = len(running) - len(chunks)
        runnable = sum(chunks) + sum(len(s.token_ids) for s in self.waiting)
        return max(1, min(budget, -(-(runnable + num_in_flight) // pp_size)))

    def _num_new_tokens(self, seq: Sequence) -> int:
        """Tokens `seq` can run now: 0 while in flight, unless async decoding allows a plain
        next step (known tokens or the one in-flight sample as placeholder)."""
        num_in_flight = seq.num_in_flight
        if not num_in_flight:
            return len(seq.token_ids) - seq.num_computed_tokens
        if num_in_flight > 1 or not self.async_decode:
            return 0
        if seq.num_pending_samples:
            return 1 if self._can_run_ahead(seq) else 0
        return len(seq.token_ids) - seq.num_computed_tokens - seq.num_in_flight_tokens

    def _can_run_ahead(self, seq: Sequence) -> bool:
        """Whether a step may run on the in-flight sample as its input token."""
        return seq.run_ahead_from <= len(seq.output_token_ids) < seq.run_ahead_until

    def _schedule_running(self, rows: _Rows, budget: int) -> int:
        i = 0
        manager = self.block_manager
        running, block_size = self.running, self.block_size
        run_ahead = self.async_decode
        while i < len(running) and budget > 0:
            seq = running[i]
            # Hot (every running sequence, every step): the run-ahead decode inline, on plain
            # fields; everything else through `_num_new_tokens`.
            if (
                run_ahead
                and seq.num_in_flight == 1
                and seq.num_pending_samples == 1
                and seq.run_ahead_from <= len(seq.output_token_ids) < seq.run_ahead_until
            ):
                end = seq.num_computed_tokens + seq.num_in_flight_tokens + 1
                if end <= len(seq.block_table) * block_size:
                    self._add_run_ahead(rows, seq, end)
                    budget -= 1
                    i += 1
                    continue
            elif not seq.num_in_flight and len(seq.token_ids) - seq.num_computed_tokens == 1:
                end = seq.num_computed_tokens + 1
                if end <= len(seq.block_table) * block_size and not seq.request.image_runs:
                    self._add_decode(rows, seq, end)
                    budget -= 1
                    i += 1
                    continue
            num_new = min(self._num_new_tokens(seq), budget)
            if num_new <= 0:
                i += 1
                continue
            end = seq.num_computed_tokens + seq.num_in_flight_tokens + num_new
            if end > len(seq.block_table) * block_size:  # (else room left in its last block)
                need = manager.num_blocks_for(end) - len(seq.block_table)
                while not manager.can_allocate(need):
                    victim = self._pick_victim(after=i)
                    if victim is None:
                        break
                    self._preempt(victim)
                if not manager.can_allocate(need):
                    if self._busy(rows):
                        i += 1  # wait for in-flight sequences to return rather than recompute
                    else:
                        self._preempt(seq)  # the newest unscheduled sequence is this one
                    continue
                seq.block_table.extend(manager.allocate(need))
            if end > len(seq.token_ids):  # a run-ahead step that starts a new block
                self._add_run_ahead(rows, seq, end)
            else:
                self._add(rows, seq, num_new)
            budget -= num_new
            i += 1
        return budget

    def _busy(self, rows: _Rows) -> bool:
        """Whether a running sequence is in flight in an earlier batch (not just planned)."""
        planned = {id(seq) for seq in rows.seqs}
        return any(seq.num_in_flight > (id(seq) in planned) for seq in self.running)

    def _pick_victim(self, *, after: int) -> Sequence | None:
        """The newest running sequence behind index `after` that is not in flight."""
        for j in range(len(self.running) - 1, after, -1):
            if not self.running[j].in_flight:
                return self.running[j]
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        self.last_preempted.append(seq.request_id)
        logger.debug("preempted %s (recompute %d tokens)", seq.request_id, seq.num_tokens)

    def _schedule_waiting(self, rows: _Rows, budget: int) -> None:
        manager = self.block_manager
        # Without chunking a prompt cannot be cut to a micro-batch's share: it may use the rest
        # of the step's whole budget instead (else a prompt longer than the share never runs).
        spare = self.config.max_num_batched_tokens - len(rows.input_ids)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_hashable = (
                (seq.num_tokens - 1) // self.block_size if manager.enable_prefix_caching else 0
            )
            hits = manager.lookup(seq.full_block_hashes(num_hashable)) if num_hashable else []
            num_cached = len(hits) * self.block_size
            num_new = seq.num_tokens - num_cached
            if self.config.enable_chunked_prefill:
                num_new = min(num_new, budget)
            elif num_new > max(budget, spare):
                break
            need = manager.num_blocks_for(num_cached + num_new) - len(hits)
            if not manager.can_allocate(need, hits):
                break
            self.waiting.popleft()
            manager.record_lookup(num_hashable, len(hits))
            manager.acquire(hits)
            seq.block_table = hits + manager.allocate(need)
            seq.num_computed_tokens = num_cached
            if not seq.admitted:
                seq.admitted = True
                seq.num_cached_tokens = num_cached
                seq.first_scheduled_time = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add(rows, seq, num_new)
            budget -= num_new
            spare -= num_new

    def _add_run_ahead(self, rows: _Rows, seq: Sequence, end: int) -> None:
        """A decode step whose input token is the in-flight sample: the stage fills it from the
        previous batch's sampled ids on the device."""
        batch_id = rows.batch_id
        source_batch, source_row = seq.pending_sample
        assert source_batch == batch_id - 1
        seq.num_in_flight += 1
        seq.num_in_flight_tokens += 1
        seq.num_pending_samples += 1
        rows.deferred_rows.append(len(rows.input_ids))
        rows.deferred_sources.append(source_row)
        rows.input_ids.append(0)
        rows.seqs.append(seq)
        rows.query_lens.append(1)
        rows.context_lens.append(end - 1)
        rows.sample_flags.append(True)
        sampling = rows.sampling
        seq.pending_sample = (batch_id, len(sampling))
        request = self._sampling_requests.get(seq.request.request_id)
        sampling.append(request or self._sampling_request(seq))

    def _add_decode(self, rows: _Rows, seq: Sequence, end: int) -> None:
        """A plain decode step (nothing in flight, its last token known, no image rows): what
        `_add` does for one token, without the general case's checks."""
        seq.num_in_flight += 1
        seq.num_in_flight_tokens += 1
        seq.num_pending_samples += 1
        rows.input_ids.append(seq.token_ids[-1])
        rows.seqs.append(seq)
        rows.query_lens.append(1)
        rows.context_lens.append(end - 1)
        rows.sample_flags.append(True)
        sampling = rows.sampling
        seq.pending_sample = (rows.batch_id, len(sampling))
        sampling.append(self._sampling_request(seq))

    def _add(self, rows: _Rows, seq: Sequence, num_new: int) -> None:
        """Plan `num_new` known tokens of `seq` (a prefill chunk or a plain decode step)."""
        start = seq.num_computed_tokens + seq.num_in_flight_tokens
        end = start + num_new
        sample = end == len(seq.token_ids) + seq.num_pending_samples
        assert end <= len(seq.token_ids), "known tokens only: run-ahead steps are planned apart"
        seq.num_in_flight += 1
        seq.num_in_flight_tokens += num_new
        input_ids = rows.input_ids
        if seq.request.image_runs:
            positions, image_rows = seq.image_rows(start, end)
            if image_rows:
                offset = len(input_ids) - start
                rows.image_indices.extend(p + offset for p in positions)
                embeds = seq.request.image_embeds
                assert embeds is not None
                rows.image_parts.append(embeds[image_rows[0] : image_rows[-1] + 1])  # [rows, D]
        if num_new == 1:
            input_ids.append(seq.token_ids[start])
        else:
            input_ids.extend(seq.token_ids[start:end])
        rows.seqs.append(seq)
        rows.query_lens.append(num_new)
        rows.context_lens.append(start)
        rows.sample_flags.append(sample)
        if sample:
            seq.num_pending_samples += 1
            seq.pending_sample = (rows.batch_id, len(rows.sampling))
            rows.sampling.append(self._sampling_request(seq))

    def _build_batch(self, rows: _Rows) -> ScheduledBatch:
        seqs = rows.seqs
        batch = ScheduledBatch(
            batch_id=rows.batch_id,
            request_ids=[seq.request.request_id for seq in seqs],
            input_token_ids=rows.input_ids,
            query_lens=rows.query_lens,
            context_lens=rows.context_lens,
            prompt_lens=[len(seq.request.prompt_token_ids) for seq in seqs],
            block_tables=[seq.block_table.copy() for seq in seqs],
            sample_flags=rows.sample_flags,
            sampling=rows.sampling,
            block_size=self.block_size,
            image_embeds=torch.cat(rows.image_parts) if rows.image_parts else None,  # [rows, D]
            image_token_indices=rows.image_indices,
            finished_request_ids=self._finished_ids,
            deferred_token_rows=rows.deferred_rows,
            deferred_sample_rows=rows.deferred_sources,
        )
        self._finished_ids = []
        self._next_batch_id += 1
        return batch

    # ---- results --------------------------------------------------------------------------
    def update(self, batch_id: int, sampled_token_ids: list[int]) -> list[Sequence]:
        """Apply a finished batch: advance KV progress, cache full blocks, append sampled tokens.

        Returns the sequences that received a token (the engine checks them for stops);
        sequences finished while the batch was in flight are skipped.
        """
        rows = self._in_flight.pop(batch_id)
        assert len(sampled_token_ids) == len(rows.sampling), "one sampled token per sample"
        manager = self.block_manager
        caching, block_size = manager.enable_prefix_caching, self.block_size
        grown: list[Sequence] = []
        tokens = iter(sampled_token_ids)
        token = 0
        for seq, num_new, sample in zip(rows.seqs, rows.query_lens, rows.sample_flags, strict=True):
            # hot: every sequence of every step
            seq.num_in_flight -= 1
            seq.num_in_flight_tokens -= num_new
            if sample:
                token = next(tokens)
                seq.num_pending_samples -= 1
            if seq.status in _FINISHED:
                continue
            computed = seq.num_computed_tokens
            seq.num_computed_tokens = computed + num_new
            if caching and (computed + num_new) // block_size > computed // block_size:
                old_full, new_full = computed // block_size, (computed + num_new) // block_size
                hashes = seq.full_block_hashes(new_full)
                for idx in range(old_full, new_full):
                    manager.register(seq.block_table[idx], hashes[idx])
            if sample:
                seq.token_ids.append(token)  # Sequence.append_token, inlined
                seq.output_token_ids.append(token)
                grown.append(seq)
        return grown

    def _sampling_request(self, seq: Sequence) -> SamplingRequest:
        """Built once per request: it holds the sequence's own (growing) output list."""
        request = self._sampling_requests.get(seq.request_id)
        if request is None:
            request = _sampling_request(seq)
            self._sampling_requests[seq.request_id] = request
        return request


def _reads_history(params: SamplingParams) -> bool:
    """Whether the sampler reads the token ids (penalties)."""
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def _sampling_request(seq: Sequence) -> SamplingRequest:
    params = seq.request.params
    # Token histories only travel when the sampler reads them (they can be long): penalties
    # read the ids, min_tokens only the output count.
    penalised = _reads_history(params)
    # min_tokens: the sampler counts outputs from this list, so it must stay whole once used.
    outputs = penalised or params.min_tokens > 0
    return SamplingRequest(
        request_id=seq.request_id,
        params=params,
        prompt_token_ids=seq.request.prompt_token_ids if penalised else [],
        output_token_ids=seq.output_token_ids if outputs else [],
        eos_token_ids=seq.request.eos_token_ids,
    )
