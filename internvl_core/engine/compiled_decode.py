"""Compiled decode: decode-only batches padded to size buckets over persistent buffers.

A ScheduledBatch whose every sequence has one new token -> its rows copied into persistent
index buffers, padded to a batch bucket (and a block-table width bucket) -> the decode forward
under `torch.compile(fullgraph=True)`, replayed per bucket as a CUDA graph on CUDA -> hidden
states of the real rows. Padding rows write to a scratch KV block that no sequence owns.
"""

from __future__ import annotations

import logging
import math
import time
import types
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
from internvl_core.model.triton_decode_attention import triton_available

logger = logging.getLogger(__name__)

# Batch-size buckets (capped by max_num_seqs, which is always a bucket itself).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Narrowest block-table width bucket, in blocks; wider ones double up to max_model_len's blocks.
MIN_WIDTH_BLOCKS = 4

DecodeStep = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]], torch.Tensor
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

    auto: "graphs" on CUDA when Triton is there (its paged decode attention runs inside the
    graphs), else off. On an H200 (benchmarks/GPU_NOTES.md, run 2: 8B-shaped bf16 decoder, 1k
    context) graphs took 5.0 / 6.5 / 8.0 / 10.8 ms per step at batch 1 / 16 / 64 / 128 against
    eager's 34.2 / 35.1 / 32.5 / 32.9 (eager is launch-bound), and the gpu tests passed. Off on
    CPU: benchmarks/compile.py (768 wide, 12 layers, 384-token context, 2 cores, the C++ kernel
    inside the graph) measured 0.75x / 0.65x / 0.76x / 0.86x eager at batch 1 / 8 / 32 / 128
    (with inductor freezing 0.84x / 1.13x / 1.03x / 1.04x), after a minute of compile.
    """
    if option == "off":
        return "off"
    if option == "auto":
        return "graphs" if device.type == "cuda" and triton_available() else "off"
    return "graphs" if device.type == "cuda" else "compiled"


@dataclass(slots=True)
class DecodeView:
    """The persistent buffers of one (batch bucket, width bucket); `prepare` fills them."""

    num_seqs: int  # real rows of this step; rows [num_seqs, batch) are padding
    index: torch.Tensor  # [5, batch] int64: ids, positions, slots, seq lens, long-rope flags
    block_tables: torch.Tensor  # [batch, width] int64
    hidden: torch.Tensor | None  # [batch, D] input hidden states (later stages)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.index[0]  # [batch] int64 (first stage), a view: writes land in the buffer


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
        # Host staging of ids, positions, slots, seq lens, long-rope flags (copy source only).
        self._host = torch.zeros((5, self.batch_buckets[-1]), dtype=torch.int64)
        # Persistent device buffers per (rows, width) bucket: standalone tensors (not views of
        # one max-size buffer, whose static size would pin dynamo's shapes), fixed addresses.
        self._buckets: dict[tuple[int, int], DecodeView] = {}
        self._kv_caches: list[torch.Tensor] = []
        self._scratch_block = -1
        model.rope.prepare_decode(self.device)
        self._step: DecodeStep = torch.compile(
            _own_code(self._decode_step), fullgraph=True, dynamic=False, backend=backend
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

    def warm_up(self) -> None:
        """Compile (on CUDA: capture) every batch bucket now, at the narrowest width, over padding
        rows only (they write the scratch block), so no request waits behind a compile. Rows and
        width are dynamic past 1, so a wider bucket later costs only its capture."""
        assert self._scratch_block >= 0, "bind() first"
        start = time.perf_counter()
        width = self.width_buckets[0]
        for rows in self.batch_buckets:
            view = self._bucket(rows, width)
            view.num_seqs = 0
            host = self._host[:, :rows]  # [5, rows]: every row a padding row
            host.zero_()
            host[2] = self._scratch_block * self.block_size
            host[3] = 1
            view.index.copy_(host)
            view.block_tables.fill_(self._scratch_block)
            if view.hidden is not None:
                view.hidden.zero_()
            self.forward(view)
        logger.info(
            "compiled decode warm: %d batch buckets (%s) in %.1f s",
            len(self.batch_buckets),
            "CUDA graphs" if self.use_cuda_graphs else "compiled",
            time.perf_counter() - start,
        )

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
        if self._long_rope_threshold is not None:
            # Decode reference length: max(prompt, position + 1), as prepare_input decides it.
            prompt_lens = np.array(batch.prompt_lens, dtype=np.int64)  # [S]
            reference = np.maximum(prompt_lens, positions + 1)  # [S]
            host[4, :num_seqs] = reference > self._long_rope_threshold
            host[4, num_seqs:] = 0
        view = self._bucket(rows, width)
        view.num_seqs = num_seqs
        # Blocking copies from pageable memory, as prepare_input's: the host buffer is reused.
        view.index.copy_(self._host[:, :rows])
        view.block_tables.copy_(torch.from_numpy(tables))
        if view.hidden is not None:
            assert hidden is not None, "a later stage needs the previous stage's hidden states"
            view.hidden[:num_seqs].copy_(hidden)
        return view

    def _bucket(self, rows: int, width: int) -> DecodeView:
        """The persistent buffers of one bucket, allocated on first use."""
        key = (rows, width)
        if key not in self._buckets:
            device = self.device
            index = torch.zeros((5, rows), dtype=torch.int64, device=device)  # [5, rows]
            tables = torch.zeros((rows, width), dtype=torch.int64, device=device)  # [rows, W]
            hidden = None
            if not self.model.is_first_stage:
                width_d, dtype = self.model.arch.hidden_size, self.model.dtype
                hidden = torch.zeros((rows, width_d), dtype=dtype, device=device)  # [rows, D]
            # One graph serves every bucket: rows and width are symbolic (batch 1 and width 1
            # would be specialised by dynamo anyway, so they get their own graphs).
            for tensor, dim, size in ((index, 1, rows), (tables, 0, rows), (tables, 1, width)):
                if size > 1:
                    torch._dynamo.mark_dynamic(tensor, dim)
            if hidden is not None and rows > 1:
                torch._dynamo.mark_dynamic(hidden, 0)
            self._buckets[key] = DecodeView(0, index, tables, hidden)
        return self._buckets[key]

    def forward(self, view: DecodeView) -> torch.Tensor:
        """Run the decode forward over the bucket; hidden [num_seqs, D] of the real rows."""
        if not self.use_cuda_graphs:
            out = self._run(view)
            return out[: view.num_seqs]  # [S, D]
        key = tuple(view.block_tables.shape)
        if key not in self._graphs:
            self._graphs[key] = self._capture(view)
        graph, out = self._graphs[key]
        graph.replay()
        return out[: view.num_seqs].clone()  # [S, D]: the graph's output buffer is reused

    def _run(self, view: DecodeView) -> torch.Tensor:
        # Without duck shaping, rows and width never get unified because they happen to be
        # equal in the first traced bucket (which would force a recompile later).
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return self._step(view.index, view.block_tables, view.hidden, self._kv_caches)

    def _decode_step(
        self,
        index: torch.Tensor,
        block_tables: torch.Tensor,
        hidden: torch.Tensor | None,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """index [5, B] (ids, positions, slots, seq lens, long flags) + block tables [B, W] ->
        embed (first stage) or take hidden [B, D] -> layers -> [B, D]."""
        long_mask = index[4] != 0 if self._long_rope_threshold is not None else None  # [B]
        meta = DecodeMetadata(index[2], block_tables, index[3], long_mask)
        if hidden is None:
            hidden = self.model.embed_tokens(index[0])  # [B, D]
        return self.model.forward_decode(hidden, index[1], kv_caches, meta)  # [B, D]

    def _capture(self, view: DecodeView) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (compile) on a side stream, then capture one bucket's step as a CUDA graph.

        The buffers hold this step's real indices, so the warm-up writes the same K/V the replay
        will; the capture itself executes nothing.
        """
        rows, width = view.block_tables.shape
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


def _own_code(method: DecodeStep) -> DecodeStep:
    """The bound method over a private copy of its code object. Dynamo keeps compiled entries
    (and counts recompiles against its limit of 8) per code object, so without this every
    instance in a process (stages, engines, tests) would share one budget; with it each instance
    holds its own one or two entries (batch 1 is specialised), freed with it."""
    func = method.__func__  # type: ignore[attr-defined]
    code = func.__code__.replace()  # a distinct code object with the same body
    own = types.FunctionType(code, func.__globals__, func.__name__, func.__defaults__)
    return types.MethodType(own, method.__self__)  # type: ignore[attr-defined]


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
