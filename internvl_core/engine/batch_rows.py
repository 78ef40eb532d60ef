"""One batch as the scheduler plans it, row by row -> the `ScheduledBatch` a stage receives.

The scheduler decides which sequences run; `BatchRows` records their rows and the in-flight
counters of each sequence, and is kept while the batch is in flight (`Scheduler.update` reads
`seqs`, `query_lens` and `sample_flags` back). Three kinds of rows: known tokens (a prefill chunk
or a plain decode step), the plain decode step inlined, and a run-ahead step whose input token is
a sample of an earlier batch still in flight (filled on stage 0 from that batch's output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from internvl_core.engine.batch import SamplingRequest, ScheduledBatch
from internvl_core.engine.sequence import Sequence


@dataclass(slots=True)
class BatchRows:
    """Sequence s owns rows in the order planned."""

    batch_id: int
    seqs: list[Sequence] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)  # [num_tokens]
    query_lens: list[int] = field(default_factory=list)  # [num_seqs]
    context_lens: list[int] = field(default_factory=list)  # [num_seqs]
    sample_flags: list[bool] = field(default_factory=list)  # [num_seqs]
    sampling: list[SamplingRequest] = field(default_factory=list)  # [num_samples]
    deferred_rows: list[int] = field(default_factory=list)  # [num_deferred]
    # Where each deferred row's token is sampled: a batch id and a row among its samples.
    deferred_batches: list[int] = field(default_factory=list)  # [num_deferred]
    deferred_samples: list[int] = field(default_factory=list)  # [num_deferred]
    image_indices: list[int] = field(default_factory=list)  # [num_image_rows]
    image_parts: list[torch.Tensor] = field(default_factory=list)  # each [rows, D]

    def add_run_ahead(self, seq: Sequence, end: int, request: SamplingRequest) -> None:
        """A decode step whose input token is `seq`'s in-flight sample (stage 0 fills it from
        the sampling batch's output on the device); `end` is its KV length after the step."""
        seq.num_in_flight += 1
        seq.num_in_flight_tokens += 1
        seq.num_pending_samples += 1
        source_batch, source_row = seq.pending_sample
        self.deferred_rows.append(len(self.input_ids))
        self.deferred_batches.append(source_batch)
        self.deferred_samples.append(source_row)
        self._one_token_row(seq, 0, end, request)  # placeholder id, filled on the device

    def add_decode(self, seq: Sequence, end: int, request: SamplingRequest) -> None:
        """A plain decode step (nothing in flight, its last token known, no image rows): what
        `add` does for one token, without the general case's checks."""
        seq.num_in_flight += 1
        seq.num_in_flight_tokens += 1
        seq.num_pending_samples += 1
        self._one_token_row(seq, seq.token_ids[-1], end, request)

    def _one_token_row(
        self, seq: Sequence, token_id: int, end: int, request: SamplingRequest
    ) -> None:
        """One sampled row of one new token at position `end - 1`."""
        self.input_ids.append(token_id)
        self.seqs.append(seq)
        self.query_lens.append(1)
        self.context_lens.append(end - 1)
        self.sample_flags.append(True)
        sampling = self.sampling
        seq.pending_sample = (self.batch_id, len(sampling))
        sampling.append(request)

    def add(
        self, seq: Sequence, num_new: int, request_for: Callable[[Sequence], SamplingRequest]
    ) -> None:
        """Plan `num_new` known tokens of `seq` (a prefill chunk or a plain decode step);
        `request_for(seq)` gives its SamplingRequest when the chunk samples."""
        start = seq.num_computed_tokens + seq.num_in_flight_tokens
        end = start + num_new
        sample = end == len(seq.token_ids) + seq.num_pending_samples
        assert end <= len(seq.token_ids), "known tokens only: run-ahead steps are planned apart"
        seq.num_in_flight += 1
        seq.num_in_flight_tokens += num_new
        input_ids = self.input_ids
        if seq.request.image_runs:
            positions, image_rows = seq.image_rows(start, end)
            if image_rows:
                offset = len(input_ids) - start
                self.image_indices.extend(p + offset for p in positions)
                embeds = seq.request.image_embeds
                assert embeds is not None
                self.image_parts.append(embeds[image_rows[0] : image_rows[-1] + 1])  # [rows, D]
        if num_new == 1:
            input_ids.append(seq.token_ids[start])
        else:
            input_ids.extend(seq.token_ids[start:end])
        self.seqs.append(seq)
        self.query_lens.append(num_new)
        self.context_lens.append(start)
        self.sample_flags.append(sample)
        if sample:
            seq.num_pending_samples += 1
            seq.pending_sample = (self.batch_id, len(self.sampling))
            self.sampling.append(request_for(seq))

    def build(
        self,
        *,
        block_size: int,
        finished_request_ids: list[str],
        num_samples_of: Callable[[int], int],
    ) -> ScheduledBatch:
        """The ScheduledBatch of these rows; `num_samples_of(batch_id)` counts the samples of an
        in-flight batch (to index the deferred rows' sources concatenated)."""
        seqs = self.seqs
        source_ids, sample_rows = self._deferred_sources(num_samples_of)
        return ScheduledBatch(
            batch_id=self.batch_id,
            request_ids=[seq.request.request_id for seq in seqs],
            input_token_ids=self.input_ids,
            query_lens=self.query_lens,
            context_lens=self.context_lens,
            prompt_lens=[len(seq.request.prompt_token_ids) for seq in seqs],
            block_tables=[seq.block_table.copy() for seq in seqs],
            sample_flags=self.sample_flags,
            sampling=self.sampling,
            block_size=block_size,
            image_embeds=torch.cat(self.image_parts) if self.image_parts else None,  # [rows, D]
            image_token_indices=self.image_indices,
            finished_request_ids=finished_request_ids,
            deferred_token_rows=self.deferred_rows,
            deferred_sample_rows=sample_rows,
            deferred_source_batch_ids=source_ids,
        )

    def _deferred_sources(
        self, num_samples_of: Callable[[int], int]
    ) -> tuple[list[int], list[int]]:
        """(source batch ids in submission order, each deferred row's index into their samples
        concatenated in that order)."""
        batches, rows = self.deferred_batches, self.deferred_samples
        if not batches:
            return [], []
        if batches.count(batches[0]) == len(batches):  # the common case: one source
            return [batches[0]], rows
        source_ids = sorted(set(batches))
        offsets: dict[int, int] = {}
        total = 0
        for batch_id in source_ids:
            offsets[batch_id] = total
            total += num_samples_of(batch_id)
        return source_ids, [offsets[b] + row for b, row in zip(batches, rows, strict=True)]
