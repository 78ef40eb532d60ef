"""One pipeline stage: ScheduledBatch (+ the previous stage's hidden states) -> StageOutput.

Stage 0 embeds tokens (run-ahead rows take their ids from earlier batches' sampled outputs, on
the device) and splices image embeddings at `<IMG_CONTEXT>` rows; every stage builds the
AttentionMetadata on its own device and runs its layers; the last stage applies the head and
samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch

from internvl_core.config import EngineConfig
from internvl_core.engine.batch import ModelInput, ScheduledBatch, StageOutput
from internvl_core.engine.compiled_decode import CompiledDecode
from internvl_core.engine.kv_cache import (
    KVCache,
    has_explicit_budget,
    kv_block_bytes,
    plan_num_blocks,
)
from internvl_core.engine.memory_plan import CudaMemoryReader, MemoryReader, measure_kv_plan
from internvl_core.engine.sampler import Sampler, SamplerOutput, SamplingBatch, make_generator
from internvl_core.engine.structured import StructuredOutputs
from internvl_core.model.attention_metadata import AttentionMetadata
from internvl_core.model.cpu_kernels import load_cpu_kernels
from internvl_core.model.cpu_linear import prepack_linears
from internvl_core.model.decoder import DecoderModel

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns a DecoderModel (layers [lo, hi)), its KV block pool and, on the last stage, the
    sampler with each request's seeded generator (kept here so remote stages keep RNG state)
    and grammar matcher (`structured`: its tokenizer is loaded on the first constrained request;
    without one, a response_format request fails)."""

    def __init__(
        self,
        model: DecoderModel,
        *,
        block_size: int,
        sampler: Sampler | None = None,
        structured: StructuredOutputs | None = None,
        compiled_decode: CompiledDecode | None = None,
    ) -> None:
        self.model = model
        # Decode-only steps through padded buckets and the compiled forward (None = all eager).
        self.compiled_decode = compiled_decode
        self.block_size = block_size
        self.device = model.device
        self.kv_cache: KVCache | None = None
        self.sampler = (sampler or Sampler()) if model.is_last_stage else None
        vocab_size = model.arch.vocab_size
        self.structured = structured or StructuredOutputs(None, vocab_size=vocab_size)
        self._generators: dict[str, torch.Generator | None] = {}
        if self.device.type == "cpu" and model.dtype == torch.float32:
            load_cpu_kernels()  # build or load the C++ attention kernel now, not in a request
            prepack_linears(model)  # oneDNN-packed weights for every plain linear
        scaling = model.arch.rope_scaling
        self._long_rope_threshold: int | None = None
        if scaling is not None and scaling.type == "longrope":
            self._long_rope_threshold = scaling.original_max_position_embeddings

    # ---- KV memory ------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        return kv_block_bytes(
            self.model.arch, self.model.num_layers, self.block_size, self.model.dtype
        )

    def plan_kv_blocks(self, config: EngineConfig, reader: MemoryReader | None = None) -> int:
        """How many blocks this stage can hold: the config's explicit budget, else on CUDA (or
        with a `reader`) what `gpu_memory_utilization` leaves after a measured profiling step,
        else the CPU default."""
        if not has_explicit_budget(config) and (reader is not None or self.device.type == "cuda"):
            reader = reader if reader is not None else CudaMemoryReader(self.device)
            return measure_kv_plan(self, config, reader).num_blocks
        return plan_num_blocks(config, block_bytes=self.kv_block_bytes(), device=self.device)

    def init_kv_cache(self, num_blocks: int, *, warm_up: bool = True) -> None:
        """Allocate the pool; every stage gets the same count (block tables are shared).
        With compiled decode one more block, `num_blocks`, takes the padding rows' writes, and
        every batch bucket is compiled (CUDA: captured) now unless `warm_up` is False (the
        memory profile's scratch pool)."""
        extra = 1 if self.compiled_decode is not None else 0
        tensors = self.model.allocate_kv_caches(num_blocks + extra, self.block_size)
        self.kv_cache = KVCache(tensors, num_blocks, self.block_size)
        if self.compiled_decode is not None:
            self.compiled_decode.bind(tensors, scratch_block=num_blocks)
            if warm_up:
                self.compiled_decode.warm_up()

    # ---- one step -------------------------------------------------------------------------
    def prepare_input(self, batch: ScheduledBatch) -> ModelInput:
        """Index tensors of one step, built with a handful of vectorised numpy ops on the host
        (no per-token loop), each moved to the device once."""
        num_seqs, block_size = batch.num_seqs, batch.block_size
        query_lens = np.array(batch.query_lens, dtype=np.int64)  # [S]
        context = np.array(batch.context_lens, dtype=np.int64)  # [S]
        ends = np.cumsum(query_lens)  # [S]
        if len(batch.input_token_ids) == num_seqs:  # decode only: one token per sequence
            seq_index = np.arange(num_seqs)  # [T]
            positions = context  # [T]
        else:
            seq_index = np.repeat(np.arange(num_seqs), query_lens)  # [T]
            rows = np.arange(int(ends[-1]))  # [T]
            positions = rows - (ends - query_lens)[seq_index] + context[seq_index]  # [T]
        host_tables = _pad_block_tables(batch.block_tables)  # [S, max_num_blocks]
        blocks = host_tables[seq_index, positions // block_size]  # [T]
        slots = blocks * block_size + positions % block_size  # [T]
        device = self.device
        positions_t = torch.from_numpy(positions)  # [T]
        long_mask = None
        if self._long_rope_threshold is not None:
            # Per token, the original's reference length: the whole prompt while prefilling (it
            # prefills in one forward), position + 1 while decoding.
            prompt_lens = np.array(batch.prompt_lens, dtype=np.int64)[seq_index]  # [T]
            reference = np.maximum(prompt_lens, positions + 1)  # [T]
            long_mask = torch.from_numpy(reference > self._long_rope_threshold).to(device)  # [T]
        flags = np.array(batch.sample_flags, dtype=bool)  # [S]
        sample_indices = (ends - 1)[flags]  # [num_samples]
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(device),
            block_tables=torch.from_numpy(host_tables).to(device),
            query_lens=batch.query_lens,
            seq_lens=(context + query_lens).tolist(),
            block_size=block_size,
            long_rope_mask=long_mask,
            host_block_tables=host_tables,
        )
        input_ids = torch.from_numpy(np.array(batch.input_token_ids, dtype=np.int64))  # [T]
        return ModelInput(
            input_ids=input_ids.to(device),
            positions=positions_t.to(device),
            attn=attn,
            sample_indices=torch.from_numpy(sample_indices).to(device),
        )

    @torch.inference_mode()
    def execute(
        self,
        batch: ScheduledBatch,
        hidden: torch.Tensor | None = None,
        *,
        sources: Sequence[StageOutput] = (),
    ) -> StageOutput:
        """Run this stage on `batch`; `hidden` [num_tokens, D] comes from the previous stage.
        Stage 0: `sources` are the last stage's outputs of `batch.deferred_source_batch_ids`."""
        assert self.kv_cache is not None, "init_kv_cache() first"
        model = self.model
        for request_id in batch.finished_request_ids:
            self._generators.pop(request_id, None)
        self.structured.free(batch.finished_request_ids)  # structured outputs: drop matchers
        compiled = self.compiled_decode
        if compiled is not None and compiled.supports(batch):
            return self._execute_compiled(compiled, batch, hidden, sources)
        inputs = self.prepare_input(batch)
        if batch.deferred_token_rows and model.is_first_stage:
            self._fill_deferred(batch, inputs.input_ids, sources)
        if model.is_first_stage:
            hidden = self._embed(batch, inputs)  # [T, D]
        else:
            assert hidden is not None, "a later stage needs the previous stage's hidden states"
            hidden = hidden.to(self.device)  # [T, D]
        hidden = model(hidden, inputs.positions, self.kv_cache.tensors, inputs.attn)  # [T, D]
        if not model.is_last_stage:
            return StageOutput(batch.batch_id, hidden_states=hidden)
        sampled = self._sample(batch, hidden, inputs.sample_indices)
        return StageOutput(batch.batch_id, sampled=sampled)

    def _execute_compiled(
        self,
        compiled: CompiledDecode,
        batch: ScheduledBatch,
        hidden: torch.Tensor | None,
        sources: Sequence[StageOutput],
    ) -> StageOutput:
        """A decode-only step through the compiled forward (padded rows dropped inside)."""
        first = self.model.is_first_stage
        view = compiled.prepare(batch, None if first else hidden)
        if batch.deferred_token_rows and first:
            self._fill_deferred(batch, view.input_ids, sources)
        hidden = compiled.forward(view)  # [S, D]
        if not self.model.is_last_stage:
            return StageOutput(batch.batch_id, hidden_states=hidden)
        flags = np.array(batch.sample_flags, dtype=bool)  # [S]
        sample_indices = torch.from_numpy(np.flatnonzero(flags)).to(self.device)  # [num_samples]
        return StageOutput(batch.batch_id, sampled=self._sample(batch, hidden, sample_indices))

    def _fill_deferred(
        self, batch: ScheduledBatch, input_ids: torch.Tensor, sources: Sequence[StageOutput]
    ) -> None:
        """Placeholder tokens take earlier batches' sampled ids, without leaving the device."""
        assert [s.batch_id for s in sources] == batch.deferred_source_batch_ids, (
            "the sampling batches' outputs, in order"
        )
        device = self.device
        parts = []
        for source in sources:
            assert source.sampled is not None, "a source is a last stage's output"
            parts.append(source.sampled.ids_on(device))  # [num_samples]
        samples = parts[0] if len(parts) == 1 else torch.cat(parts)  # [num_source_samples]
        rows = torch.from_numpy(np.array(batch.deferred_token_rows, dtype=np.int64))  # [P]
        picks = torch.from_numpy(np.array(batch.deferred_sample_rows, dtype=np.int64))  # [P]
        rows, picks = rows.to(device), picks.to(device)  # [P], [P]
        input_ids[rows] = samples[picks]

    def _embed(self, batch: ScheduledBatch, inputs: ModelInput) -> torch.Tensor:
        hidden = self.model.embed_tokens(inputs.input_ids)  # [T, D]
        if batch.image_embeds is not None:
            rows = torch.tensor(
                batch.image_token_indices, dtype=torch.long, device=self.device
            )  # [num_image_rows]
            image = batch.image_embeds.to(device=self.device, dtype=hidden.dtype)  # [rows, D]
            hidden[rows] = image
        return hidden

    def _sample(
        self, batch: ScheduledBatch, hidden: torch.Tensor, sample_indices: torch.Tensor
    ) -> SamplerOutput:
        assert self.sampler is not None
        requests = batch.sampling
        if not requests:
            return SamplerOutput(token_ids=[])
        # Every row samples only in a decode batch where each sequence does: no gather then.
        sampled_rows = hidden if len(requests) == hidden.shape[0] else hidden[sample_indices]
        logits = self.model.compute_logits(sampled_rows)  # [num_samples, V]
        if all(r.plain_greedy for r in requests):
            # The common decode step: no generators, grammar or logits processing to set up.
            chosen = logits.argmax(dim=-1)  # [num_samples]
            return SamplerOutput(device_token_ids=chosen)
        known = self._generators
        for req in requests:
            if req.request_id not in known:
                known[req.request_id] = make_generator(req.params.seed, self.device)
        sampling = SamplingBatch(
            params=[r.params for r in requests],
            generators=[known[r.request_id] for r in requests],
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[r.output_token_ids for r in requests],
            stop_token_ids=[r.eos_token_ids for r in requests],
        )
        # Structured outputs: grammar rows masked in place before sampling (others untouched),
        # then each matcher takes its row's token (before the next batch is prepared, so a
        # run-ahead step samples under the updated grammar).
        self.structured.apply_constraints(logits, batch.sampling)
        output = self.sampler(logits, sampling)
        if self.structured.num_active:  # (reading the ids back is the host's sync point)
            self.structured.advance(batch.sampling, output.token_ids)
        return output


def _pad_block_tables(tables: list[list[int]]) -> np.ndarray:
    """Block tables of unequal lengths -> [S, max_num_blocks] int64, padded with 0."""
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))  # [S]
    out = np.zeros((len(tables), max(int(lens.max()), 1)), dtype=np.int64)  # [S, max_num_blocks]
    flat = np.fromiter(chain.from_iterable(tables), dtype=np.int64, count=int(lens.sum()))
    out[np.arange(out.shape[1])[None, :] < lens[:, None]] = flat  # row-major fill
    return out
