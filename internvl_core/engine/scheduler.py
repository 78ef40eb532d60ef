"""Continuous batching: waiting/running queues -> one `ScheduledBatch` per step.

FCFS: running sequences first (decodes and unfinished prefill chunks, oldest first), then new
admissions while the token budget, `max_num_seqs` and free KV blocks allow. When blocks run out the
newest running sequence is preempted by recompute (blocks freed, back to the front of the queue).

With `async_decode` a sequence whose sample is still in flight is planned again at once: its next
token is a placeholder stage 0 fills from the sampling batch's ids on the device (vLLM V1's async
scheduling); at PP > 1 that batch's output goes from the last stage straight to stage 0, so a
micro-batch is queued again before the host has read its previous tokens. With `pp_size` > 1
each batch takes its share of the runnable tokens, so the micro-batches stay near-equal.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from internvl_core.config import EngineConfig, SamplingParams
from internvl_core.engine.batch import SamplingRequest, ScheduledBatch
from internvl_core.engine.batch_rows import BatchRows
from internvl_core.engine.block_manager import BlockManager
from internvl_core.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

# A tuple, not a set: `in` compares by identity in C (Enum.__hash__ is Python code).
_FINISHED = tuple(s for s in SequenceStatus if s.is_finished)


class Scheduler:
    """Plans every step; the only producer of ScheduledBatch and the owner of block tables."""

    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, *, async_decode: bool = False
    ) -> None:
        """`async_decode`: plan a sequence again while its sample is in flight (one step ahead
        at most; stage 0 fills the placeholder from the sampling batch's output)."""
        self.config = config
        self.async_decode = async_decode
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._next_batch_id = 0
        self._in_flight: dict[int, BatchRows] = {}
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
        rows = BatchRows(self._next_batch_id)
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
        one token, each runnable one its next chunk, each waiting one its prompt. The remainder
        goes to the first batches of a round (by batch id), so the shares sum to the round. A
        micro-batch that comes back larger than its share leaves its tail to the next one (with
        run-ahead: the tail runs ahead in the next batch instead)."""
        budget = self.config.max_num_batched_tokens
        pp_size = self.config.pp_size
        if pp_size == 1:
            return budget
        running = self.running
        chunks = [len(s.token_ids) - s.num_computed_tokens for s in running if not s.num_in_flight]
        num_in_flight = len(running) - len(chunks)
        runnable = sum(chunks) + sum(len(s.token_ids) for s in self.waiting)
        share, extra = divmod(runnable + num_in_flight, pp_size)
        share += self._next_batch_id % pp_size < extra
        return max(1, min(budget, share))

    def _num_new_tokens(self, seq: Sequence, rows: BatchRows) -> int:
        """Tokens `seq` can run now: 0 while in flight, unless async decoding allows a plain
        next step (known tokens or the one in-flight sample as placeholder)."""
        num_in_flight = seq.num_in_flight
        if not num_in_flight:
            return len(seq.token_ids) - seq.num_computed_tokens
        if num_in_flight > 1 or not self.async_decode:
            return 0
        if seq.num_pending_samples:
            return 1 if self._can_run_ahead(seq, rows) else 0
        return len(seq.token_ids) - seq.num_computed_tokens - seq.num_in_flight_tokens

    def _can_run_ahead(self, seq: Sequence, rows: BatchRows) -> bool:
        """Whether a step may run on the in-flight sample as its input token: allowed by the
        params, and sampled at least pp_size batches back (else stage 0 would wait for a batch
        still ahead of it in the pipeline)."""
        return (
            seq.run_ahead_from <= len(seq.output_token_ids) < seq.run_ahead_until
            and seq.pending_sample[0] <= rows.batch_id - self.config.pp_size
        )

    def _schedule_running(self, rows: BatchRows, budget: int) -> int:
        i = 0
        manager = self.block_manager
        running, block_size = self.running, self.block_size
        run_ahead, requests = self.async_decode, self._sampling_requests
        latest_source = rows.batch_id - self.config.pp_size  # see `_can_run_ahead`
        while i < len(running) and budget > 0:
            seq = running[i]
            # Hot (every running sequence, every step): the run-ahead decode inline, on plain
            # fields; everything else through `_num_new_tokens`.
            if (
                run_ahead
                and seq.num_in_flight == 1
                and seq.num_pending_samples == 1
                and seq.run_ahead_from <= len(seq.output_token_ids) < seq.run_ahead_until
                and seq.pending_sample[0] <= latest_source
            ):
                end = seq.num_computed_tokens + seq.num_in_flight_tokens + 1
                if end <= len(seq.block_table) * block_size:
                    request = requests.get(seq.request.request_id) or self._sampling_request(seq)
                    rows.add_run_ahead(seq, end, request)
                    budget -= 1
                    i += 1
                    continue
            elif not seq.num_in_flight and len(seq.token_ids) - seq.num_computed_tokens == 1:
                end = seq.num_computed_tokens + 1
                if end <= len(seq.block_table) * block_size and not seq.request.image_runs:
                    rows.add_decode(seq, end, self._sampling_request(seq))
                    budget -= 1
                    i += 1
                    continue
            num_new = min(self._num_new_tokens(seq, rows), budget)
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
                rows.add_run_ahead(seq, end, self._sampling_request(seq))
            else:
                rows.add(seq, num_new, self._sampling_request)
            budget -= num_new
            i += 1
        return budget

    def _busy(self, rows: BatchRows) -> bool:
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

    def _schedule_waiting(self, rows: BatchRows, budget: int) -> None:
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
            rows.add(seq, num_new, self._sampling_request)
            budget -= num_new
            spare -= num_new

    def _build_batch(self, rows: BatchRows) -> ScheduledBatch:
        in_flight = self._in_flight
        batch = rows.build(
            block_size=self.block_size,
            finished_request_ids=self._finished_ids,
            num_samples_of=lambda batch_id: len(in_flight[batch_id].sampling),
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
