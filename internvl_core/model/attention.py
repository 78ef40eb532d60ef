"""Paged attention over block tables: write new K/V into their cache slots, then attend causally.

Two backends behind one entry point, `paged_attention`:
- "kernel" (CPU, float32, when the C++ kernel builds: `cpu_kernels.load_cpu_kernels`): one call
  attends every decode row, prefill chunk and prefix hit of the batch, reading K/V in place from
  the block pool (no gathered copies, no masks); fresh prompts (no cached prefix) still take one
  causal SDPA call each over their own k/v, which beats the kernel there.
- "varlen" (CUDA, fp16/bf16, a block size FlashAttention accepts): one
  `torch.nn.attention.varlen.varlen_attn` call per layer for the whole batch, paged in place
  (`varlen_attention.py`).
- "triton" (CUDA when varlen is not available, e.g. torch < 2.13): every decode row in one
  Triton paged decode call (`triton_decode_attention.py`), prefill spans as "sdpa" does.
- "sdpa" (any device, `sdpa_attention.py`): decode rows in groups of similar context length (one
  SDPA call each, keys gathered and padded to the group's longest), one call per prefill span.

q [T, H, d], k/v [T, K, d], a layer's cache [2, num_blocks, block_size, K, d], AttentionMetadata
-> output [T, H, d]. This module plans a step once per forward (`plan_attention`) and dispatches
each layer (`paged_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from internvl_core.model.attention_metadata import AttentionMetadata
from internvl_core.model.cpu_kernels import load_cpu_kernels
from internvl_core.model.sdpa_attention import (
    GROUP_COST_ROWS,
    GROUPS,
    DecodeGroup,
    PrefillSpan,
    decode_group,
    prefill_span,
    sdpa_decode,
    sdpa_prefill,
)
from internvl_core.model.triton_decode_attention import launch_paged_decode, triton_available
from internvl_core.model.varlen_attention import (
    VarlenPlan,
    plan_varlen,
    varlen_paged_attention,
    varlen_supported,
)


@dataclass(slots=True)
class KernelSpans:
    """The sequences the fused CPU kernel attends in one call (every one but fresh prompts)."""

    block_tables: torch.Tensor  # [S', max_num_blocks] int64
    query_start: torch.Tensor  # [S'] int64 first token row of each sequence
    query_lens: torch.Tensor  # [S'] int64
    seq_lens: torch.Tensor  # [S'] int64


@dataclass(slots=True)
class PagedDecodeRows:
    """The one-query sequences the Triton decode kernel attends in one call ("triton")."""

    rows: torch.Tensor  # [n] int64 token rows
    block_tables: torch.Tensor  # [n, W] int64, W = the longest of them in blocks
    seq_lens: torch.Tensor  # [n] int64


@dataclass(slots=True)
class AttentionPlan:
    """Index tensors derived once per forward from AttentionMetadata and shared by every layer."""

    decode_groups: list[DecodeGroup]
    prefills: list[PrefillSpan]
    decode_only: bool  # one group holding every token row in order: the output needs no scatter
    kernel: KernelSpans | None = None  # "kernel" backend: these rows in one fused call
    varlen: VarlenPlan | None = None  # "varlen" backend: every row in one call
    paged_decode: PagedDecodeRows | None = None  # "triton" backend: every decode row


def choose_backend(
    device: torch.device | str,
    dtype: torch.dtype | None,
    *,
    block_size: int | None = None,
    heads: tuple[int, int, int] | None = None,
) -> str:
    """ "kernel" on the CPU in float32 when the C++ kernel is built and loaded; "varlen" on CUDA
    when FlashAttention runs this (dtype, block_size, (H, K, d) `heads`); else "triton" on CUDA
    when Triton is there; else "sdpa"."""
    device_type = torch.device(device).type
    if device_type == "cpu" and dtype == torch.float32 and load_cpu_kernels():
        return "kernel"
    if (
        device_type == "cuda"
        and dtype is not None
        and block_size is not None
        and heads is not None
        and varlen_supported(device, dtype, block_size, *heads)
    ):
        return "varlen"
    if device_type == "cuda" and triton_available():
        return "triton"
    return "sdpa"


# "kernel" backend: sequences with more new tokens than this take SDPA (one kernel tile is 16 rows;
# past it SDPA's blocked products win: 512 rows over 1024 keys took ~2x longer in the kernel).
KERNEL_MAX_QUERY = 16


def plan_attention(
    attn: AttentionMetadata,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    *,
    backend: str | None = None,
) -> AttentionPlan:
    """Split the batch for the backend (`choose_backend(device, dtype)` when None).

    "sdpa": decode rows in grouped calls, prefill spans one call each. "kernel": fresh prompts one
    SDPA call each, every other row in one kernel call. Index arithmetic runs in numpy on the host
    (no per-sequence Python loop for decode rows); each index tensor is moved to `device` once.
    """
    query_lens = np.asarray(attn.query_lens, dtype=np.int64)  # [S]
    seq_lens = np.asarray(attn.seq_lens, dtype=np.int64)  # [S]
    assert ((query_lens >= 1) & (query_lens <= seq_lens)).all(), "1 <= query_len <= seq_len"
    starts = np.cumsum(query_lens) - query_lens  # [S] first token row of each sequence
    backend = backend or choose_backend(device, dtype)
    if backend == "kernel":
        return _kernel_plan(attn, query_lens, seq_lens, starts)
    if backend == "varlen":
        return AttentionPlan([], [], decode_only=False, varlen=plan_varlen(attn, device))
    is_decode = query_lens == 1  # [S]
    prefills: list[PrefillSpan] = []
    if not is_decode.all():
        tables = attn.block_tables.to(device)  # [num_seqs, max_num_blocks]
        for seq_id in np.flatnonzero(~is_decode).tolist():
            q_len, s_len = int(query_lens[seq_id]), int(seq_lens[seq_id])
            row = int(starts[seq_id])
            prefills.append(prefill_span(tables[seq_id], row, q_len, s_len, attn.block_size))
        decode_ids = np.flatnonzero(is_decode)  # [n]
    else:
        decode_ids = np.arange(len(query_lens))  # [n]
    groups: list[DecodeGroup] = []
    if len(decode_ids):
        host_tables = attn.host_block_tables
        if host_tables is None:
            host_tables = attn.block_tables.cpu().numpy()  # [num_seqs, max_num_blocks]
        lens = seq_lens[decode_ids]  # [n]
        if backend == "triton":
            rows = _paged_decode_rows(host_tables, decode_ids, starts, lens, attn, device)
            return AttentionPlan([], prefills, decode_only=not prefills, paged_decode=rows)
        group_cost = GROUP_COST_ROWS.get(torch.device(device).type, GROUP_COST_ROWS["cuda"])
        for members in GROUPS.groups_for(lens, group_cost):
            groups.append(
                decode_group(
                    host_tables,
                    decode_ids[members],
                    starts[decode_ids[members]],
                    lens[members],
                    attn.block_size,
                    device,
                )
            )
    # A lone group of every row (members in batch order) needs no scatter.
    return AttentionPlan(groups, prefills, decode_only=not prefills and len(groups) == 1)


def _kernel_plan(
    attn: AttentionMetadata, query_lens: np.ndarray, seq_lens: np.ndarray, starts: np.ndarray
) -> AttentionPlan:
    """Decodes and short chunks -> one kernel call; fresh prompts (query_len == seq_len > 1) and
    chunks of more than KERNEL_MAX_QUERY rows -> one SDPA call each (its blocked matrix products
    beat the kernel's per-row loops there, gathered keys included)."""
    fresh = (query_lens == seq_lens) & (query_lens > 1)  # [S]
    to_sdpa = fresh | (query_lens > KERNEL_MAX_QUERY)  # [S]
    tables = attn.host_block_tables
    if tables is None and not fresh.all():
        tables = attn.block_tables.cpu().numpy()  # [S, max_num_blocks]
    prefills = []
    for i in np.flatnonzero(to_sdpa).tolist():
        row, q_len, s_len = int(starts[i]), int(query_lens[i]), int(seq_lens[i])
        table = None if fresh[i] else torch.from_numpy(tables[i])  # [max_num_blocks]
        prefills.append(
            PrefillSpan(row, q_len, s_len, None, None)
            if table is None
            else prefill_span(table, row, q_len, s_len, attn.block_size)
        )
    kernel = None
    if not to_sdpa.all():
        keep = ~to_sdpa  # [S]
        whole = bool(keep.all())
        kernel = KernelSpans(
            block_tables=torch.from_numpy(np.ascontiguousarray(tables if whole else tables[keep])),
            query_start=torch.from_numpy(np.ascontiguousarray(starts[keep])),
            query_lens=torch.from_numpy(np.ascontiguousarray(query_lens[keep])),
            seq_lens=torch.from_numpy(np.ascontiguousarray(seq_lens[keep])),
        )
    return AttentionPlan([], prefills, decode_only=False, kernel=kernel)


def _paged_decode_rows(
    tables: np.ndarray,
    seq_ids: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    attn: AttentionMetadata,
    device: torch.device | str,
) -> PagedDecodeRows:
    """Host arrays (tables [S, max_num_blocks], ids [n], starts [S], lens [n]) -> device tensors."""
    width = -(-int(lens.max()) // attn.block_size)
    host = [starts[seq_ids], tables[seq_ids, :width], lens]  # [n], [n, W], [n]
    rows, block_tables, seq_lens = (
        torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device) for a in host
    )
    return PagedDecodeRows(rows, block_tables, seq_lens)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k/v [T, K, d] at `slot_mapping` [T] of the cache [2, num_blocks, block_size, K, d]."""
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    flat = kv_cache.view(2, num_slots, kv_cache.shape[3], kv_cache.shape[4])  # [2, slots, K, d]
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    *,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Write k/v into the cache, then attend each query row over its sequence's cached keys.

    Args:
        q: [T, H, d]; k, v: [T, K, d] (H a multiple of K: grouped-query attention).
        kv_cache: [2, num_blocks, block_size, K, d], written in place.
        plan: precomputed `plan_attention(attn, device)`; built here when None.

    Returns:
        [T, H, d] attention output.
    """
    assert q.shape[0] == attn.slot_mapping.shape[0], "one slot per new token"
    write_kv(k, v, kv_cache, attn.slot_mapping.to(k.device))
    if plan is None:
        plan = plan_attention(attn, q.device, q.dtype)
    if plan.kernel is not None:
        return _kernel_attention(q, k, v, kv_cache, plan, scale)  # [T, H, d]
    if plan.varlen is not None:
        return varlen_paged_attention(q, kv_cache, plan.varlen, scale)  # [T, H, d]
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    flat = kv_cache.view(2, num_slots, kv_cache.shape[3], kv_cache.shape[4])  # [2, slots, K, d]
    gqa = q.shape[1] != k.shape[1]
    if plan.paged_decode is not None:
        return _triton_attention(q, k, v, kv_cache, flat, plan, scale, gqa=gqa)  # [T, H, d]
    if plan.decode_only:  # one group, every row in order
        return sdpa_decode(q, flat, plan.decode_groups[0], scale, gqa=gqa)  # [T, H, d]
    out = q.new_empty(q.shape)  # [T, H, d]
    for group in plan.decode_groups:
        out[group.rows] = sdpa_decode(q, flat, group, scale, gqa=gqa)  # [g, H, d]
    for span in plan.prefills:
        rows = slice(span.row_start, span.row_start + span.query_len)
        out[rows] = sdpa_prefill(q[rows], k[rows], v[rows], flat, span, scale=scale, gqa=gqa)
    return out


def _kernel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
) -> torch.Tensor:
    """The fused CPU kernel for every sequence in `plan.kernel`, SDPA for fresh prompts."""
    spans = plan.kernel
    assert spans is not None
    q = q.contiguous()  # [T, H, d]
    out = torch.empty_like(q)  # [T, H, d]
    torch.ops.internvl_cpu.paged_attention(
        q,
        kv_cache,
        spans.block_tables,
        spans.query_start,
        spans.query_lens,
        spans.seq_lens,
        scale,
        out,
    )
    if not plan.prefills:
        return out
    gqa = q.shape[1] != k.shape[1]
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    flat = kv_cache.view(2, num_slots, kv_cache.shape[3], kv_cache.shape[4])  # [2, slots, K, d]
    for span in plan.prefills:
        rows = slice(span.row_start, span.row_start + span.query_len)
        out[rows] = sdpa_prefill(q[rows], k[rows], v[rows], flat, span, scale=scale, gqa=gqa)
    return out


def _triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    flat: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
    *,
    gqa: bool,
) -> torch.Tensor:
    """Every decode row in one Triton call; prefill spans one SDPA call each."""
    rows = plan.paged_decode
    assert rows is not None
    decoded = launch_paged_decode(
        q if plan.decode_only else q[rows.rows], kv_cache, rows.block_tables, rows.seq_lens, scale
    )  # [n, H, d]
    if plan.decode_only:
        return decoded
    out = q.new_empty(q.shape)  # [T, H, d]
    out[rows.rows] = decoded
    for span in plan.prefills:
        span_rows = slice(span.row_start, span.row_start + span.query_len)
        out[span_rows] = sdpa_prefill(
            q[span_rows], k[span_rows], v[span_rows], flat, span, scale=scale, gqa=gqa
        )
    return out
