"""Compiled decode: decode-only batches padded to size buckets over persistent buffers.

A ScheduledBatch whose every sequence has one new token -> its rows copied into persistent
index buffers, padded to a batch bucket (and a block-table width bucket) -> the decode forward
under `torch.compile(fullgraph=True)`, replayed per bucket as a CUDA graph on CUDA -> hidden
states of the real rows. Padding rows write to a scratch KV block that no sequence owns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import nn

from internvl_core.config import EngineConfig
from internvl_core.engine.batch import ScheduledBatch
from internvl_core.model.decode_attention import DecodeMetadata
from internvl_core.model.decoder import DecoderModel

logger = logging.getLogger(__name__)

# Batch-size buckets (capped by max_num_seqs, which is always a bucket itself).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Narrowest block-table width bucket, in blocks; wider ones double up to max_model_len's blocks.
MIN_WIDTH_BLOCKS = 4

DecodeStep = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor, list[torch.Tensor], DecodeMetadata],
    torch.Tensor,
]


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Bucket sizes up to `max_num_seqs`, which ends the list."""
    return [b for b in BATCH_BUCKETS if b < max_num_seqs] + [max_num_seqs]


def width_buckets(max_blocks: int) -> list[int]:
    """Block-table widths: powers of two from MIN_WIDTH_BLOCKS, ending at `max_blocks`."""
    widths: list[int] = []
    width = MIN_WIDTH_BLOCKS
    while width < max_blocks:
        widths.append(width)
        width *= 2
    return [*widths, max_blocks]


def bucket_for(size: int, buckets: list[int]) -> int:
    """The smallest bucket holding `size` (callers check `size <= buckets[-1]`)."""
    return next(b for b in buckets if b >= size)


def resolve_mode(option: str, device: torch.device) -> str:
    """`compile_decode` -> "graphs" (compiled + CUDA graphs), "compiled" or "off".

    auto: CUDA graphs on CUDA; off on CPU, where benchmarks/compile.py measured the compiled step
    no faster than eager at serving batch sizes for the compile time it costs.
    """
    if option == "off" or (option == "auto" and device.type != "cuda"):
        return "off"
    return "graphs" if device.type == "cuda" else "compiled"


@dataclass(slots=True)
class DecodeView:
    """The persistent buffers of one (batch bucket, width bucket), filled for this step."""

    num_seqs: int  # real rows; rows [num_seqs, batch) are padding
    input_ids: torch.Tensor  # [batch] int64 (first stage)
    positions: torch.Tensor  # [batch] int64
    hidden: torch.Tensor | None  # [batch, D] input hidden states (later stages)
    meta: DecodeMetadata


class CompiledDecode:
    """Persistent decode buffers, the compiled decode forward and (CUDA) one graph per bucket.

    `bind` (after the KV pool exists, with its scratch block) must precede `prepare`/`forward`.
    `backend` is torch.compile's (tests use "aot_eager" to trace without inductor's C++ build).
    """

    def __init__(
        self,
        model: DecoderModel,
        *,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        use_cuda_graphs: bool,
        backend: str = "inductor",
    ) -> None:
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.batch_buckets = batch_buckets(max_num_seqs)
        self.width_buckets = width_buckets(math.ceil(max_model_len / block_size))
        self.use_cuda_graphs = use_cuda_graphs
        scaling = model.arch.rope_scaling
        self._long_rope_threshold: int | None = None
        if scaling is not None and scaling.type == "longrope":
            self._long_rope_threshold = scaling.original_max_position_embeddings
        max_rows, max_width = self.batch_buckets[-1], self.width_buckets[-1]
        # Persistent index buffers: every bucket reads views at offset 0 (fixed addresses).
        self._host = torch.zeros((5, max_rows), dtype=torch.int64)  # ids, pos, slots, lens, long
        self._index = torch.zeros((5, max_rows), dtype=torch.int64, device=self.device)
        self._tables = torch.zeros(max_rows * max_width, dtype=torch.int64, device=self.device)
        self._long = torch.zeros(max_rows, dtype=torch.bool, device=self.device)  # [max_rows]
        self._hidden: torch.Tensor | None = None
        if not model.is_first_stage:
            width = model.arch.hidden_size
            self._hidden = torch.zeros((max_rows, width), dtype=model.dtype, device=self.device)
        self._kv_caches: list[torch.Tensor] = []
        self._scratch_block = -1
        model.rope.prepare_decode(self.device)
        self._step: DecodeStep = torch.compile(
            self._decode_step, fullgraph=True, dynamic=True, backend=backend
        )
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, model: DecoderModel, config: EngineConfig) -> CompiledDecode | None:
        """Per `config.compile_decode` on the model's device; None = eager decode."""
        mode = resolve_mode(config.compile_decode, model.device)
        if mode != "off" and not _plain_linears(model):
            logger.warning("compiled decode is off: the model has quantized layers")
            mode = "off"
        logger.info("compiled decode: %s on %s", mode, model.device)
        if mode == "off":
            return None
        return cls(
            model,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len_for(model.arch),
            block_size=config.block_size,
            use_cuda_graphs=mode == "graphs",
        )

    def bind(self, kv_caches: list[torch.Tensor], scratch_block: int) -> None:
        """Use these per-layer caches; block `scratch_block` is owned by no sequence."""
        self._kv_caches = kv_caches
        self._scratch_block = scratch_block
        self._graphs.clear()

    def supports(self, batch: ScheduledBatch) -> bool:
        """Decode-only, within the largest batch and width buckets."""
        return (
            batch.is_decode_only
            and batch.num_seqs <= self.batch_buckets[-1]
            and max(map(len, batch.block_tables)) <= self.width_buckets[-1]
            and batch.image_embeds is None
        )

    def prepare(self, batch: ScheduledBatch, hidden: torch.Tensor | None = None) -> DecodeView:
        """Copy the batch's indices (and a later stage's hidden [num_seqs, D]) into the buffers."""
        assert self._scratch_block >= 0, "bind() first"
        num_seqs, block_size = batch.num_seqs, self.block_size
        rows = bucket_for(num_seqs, self.batch_buckets)
        width = bucket_for(max(map(len, batch.block_tables)), self.width_buckets)
        host = self._host[:, :rows].numpy()  # [5, rows]
        positions = np.array(batch.context_lens, dtype=np.int64)  # [S]
        tables = _fill_tables(batch.block_tables, rows, width, self._scratch_block)
        host[0, :num_seqs] = batch.input_token_ids
        host[1, :num_seqs] = positions
        blocks = tables[np.arange(num_seqs), positions // block_size]  # [S]
        host[2, :num_seqs] = blocks * block_size + positions % block_size
        host[3, :num_seqs] = positions + 1
        # Padding rows: token 0 at position 0, written to the scratch block's first slot.
        host[0:2, num_seqs:] = 0
        host[2, num_seqs:] = self._scratch_block * block_size
        host[3, num_seqs:] = 1
        index = self._index[:, :rows]  # [5, rows]
        table_view = self._tables[: rows * width].view(rows, width)  # [rows, width]
        long_mask = None
        if self._long_rope_threshold is not None:
            # Decode reference length: max(prompt, position + 1), as prepare_input decides it.
            prompt_lens = np.array(batch.prompt_lens, dtype=np.int64)  # [S]
            reference = np.maximum(prompt_lens, positions + 1)  # [S]
            host[4, :num_seqs] = reference > self._long_rope_threshold
            host[4, num_seqs:] = 0
            long_mask = self._long[:rows]  # [rows]
        # Blocking copies from pageable memory, as prepare_input's: the host buffer is reused.
        index.copy_(self._host[:, :rows])
        table_view.copy_(torch.from_numpy(tables))
        if long_mask is not None:
            long_mask.copy_(index[4] != 0)
        hidden_view = None
        if self._hidden is not None:
            assert hidden is not None, "a later stage needs the previous stage's hidden states"
            hidden_view = self._hidden[:rows]  # [rows, D]
            hidden_view[:num_seqs].copy_(hidden)
        meta = DecodeMetadata(index[2], table_view, index[3], long_mask)
        return DecodeView(num_seqs, index[0], index[1], hidden_view, meta)

    def forward(self, view: DecodeView) -> torch.Tensor:
        """Run the decode forward over the bucket; hidden [num_seqs, D] of the real rows."""
        if not self.use_cuda_graphs:
            out = self._run(view)
            return out[: view.num_seqs]  # [S, D]
        key = (view.positions.shape[0], view.meta.block_tables.shape[1])
        if key not in self._graphs:
            self._graphs[key] = self._capture(view)
        graph, out = self._graphs[key]
        graph.replay()
        return out[: view.num_seqs].clone()  # [S, D]: the graph's output buffer is reused

    def _run(self, view: DecodeView) -> torch.Tensor:
        return self._step(view.input_ids, view.hidden, view.positions, self._kv_caches, view.meta)

    def _decode_step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: DecodeMetadata,
    ) -> torch.Tensor:
        """Embed input_ids [B] (first stage) or take hidden [B, D] -> layers -> [B, D]."""
        if hidden is None:
            hidden = self.model.embed_tokens(input_ids)  # [B, D]
        return self.model.forward_decode(hidden, positions, kv_caches, meta)  # [B, D]

    def _capture(self, view: DecodeView) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (compile) on a side stream, then capture one bucket's step as a CUDA graph.

        The buffers hold this step's real indices, so the warm-up writes the same K/V the replay
        will; the capture itself executes nothing.
        """
        rows, width = view.positions.shape[0], view.meta.block_tables.shape[1]
        logger.info("capturing a CUDA graph for decode bucket (%d rows, %d blocks)", rows, width)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(view)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = self._run(view)
        return graph, out


def _fill_tables(tables: list[list[int]], rows: int, width: int, fill: int) -> np.ndarray:
    """Block tables -> [rows, width] int64, every entry past a table (and padding rows) `fill`."""
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))  # [S]
    out = np.full((rows, width), fill, dtype=np.int64)  # [rows, width]
    flat = np.fromiter(chain.from_iterable(tables), dtype=np.int64, count=int(lens.sum()))
    used = np.zeros((rows, width), dtype=bool)  # [rows, width]
    used[: len(tables)] = np.arange(width)[None, :] < lens[:, None]
    out[used] = flat  # row-major fill
    return out


def _plain_linears(model: nn.Module) -> bool:
    """Every linear layer is a plain nn.Linear (quantized ones do not trace)."""
    return all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
