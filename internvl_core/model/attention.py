"""Paged attention over block tables: write new K/V into their cache slots, then attend causally.

Two backends behind one entry point, `paged_attention`:
- "kernel" (CPU, float32, when the C++ kernel builds: `cpu_kernels.load_cpu_kernels`): one call
  attends every decode row, prefill chunk and prefix hit of the batch, reading K/V in place from
  the block pool (no gathered copies, no masks); fresh prompts (no cached prefix) still take one
  causal SDPA call each over their own k/v, which beats the kernel there.
- "varlen" (CUDA, fp16/bf16, a block size FlashAttention accepts): one
  `torch.nn.attention.varlen.varlen_attn` call per layer for the whole batch, paged in place
  (`varlen_attention.py`).
- "sdpa" (any device): decode rows in groups of similar context length (one SDPA call each, keys
  gathered and padded to the group's longest), one SDPA call per prefill span.

q [T, H, d], k/v [T, K, d], a layer's cache [2, num_blocks, block_size, K, d], AttentionMetadata
-> output [T, H, d]. Torch SDPA backend (CPU and GPU); `paged_attention` is the one entry point,
so a faster GPU kernel can be dispatched behind it later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from internvl_core.model.attention_metadata import AttentionMetadata
from internvl_core.model.cpu_kernels import load_cpu_kernels
from internvl_core.model.varlen_attention import (
    VarlenPlan,
    plan_varlen,
    varlen_paged_attention,
    varlen_supported,
)


@dataclass(slots=True)
class PrefillSpan:
    """One sequence with more than one query row in this step."""

    row_start: int  # first token row of the sequence in the flattened batch
    query_len: int
    seq_len: int
    # [seq_len] int64 cache slots of positions 0..seq_len-1; None = no cached prefix, use fresh K/V
    key_slots: torch.Tensor | None
    # [query_len, seq_len] bool, True = may attend; None = plain causal (query_len == seq_len)
    mask: torch.Tensor | None


@dataclass(slots=True)
class DecodeGroup:
    """One-query sequences of similar length, attended in one SDPA call (keys padded to the
    group's longest)."""

    rows: torch.Tensor  # [g] int64 token rows
    slots: torch.Tensor  # [g, max_seq_len] int64 cache slots, padded
    mask: torch.Tensor | None  # [g, 1, 1, max_seq_len] bool key-padding mask; None = no padding


@dataclass(slots=True)
class KernelSpans:
    """The sequences the fused CPU kernel attends in one call (every one but fresh prompts)."""

    block_tables: torch.Tensor  # [S', max_num_blocks] int64
    query_start: torch.Tensor  # [S'] int64 first token row of each sequence
    query_lens: torch.Tensor  # [S'] int64
    seq_lens: torch.Tensor  # [S'] int64


@dataclass(slots=True)
class AttentionPlan:
    """Index tensors derived once per forward from AttentionMetadata and shared by every layer."""

    decode_groups: list[DecodeGroup]
    prefills: list[PrefillSpan]
    decode_only: bool  # one group holding every token row in order: the output needs no scatter
    kernel: KernelSpans | None = None  # "kernel" backend: these rows in one fused call
    varlen: VarlenPlan | None = None  # "varlen" backend: every row in one call


def choose_backend(
    device: torch.device | str,
    dtype: torch.dtype | None,
    *,
    block_size: int | None = None,
    heads: tuple[int, int, int] | None = None,
) -> str:
    """ "kernel" on the CPU in float32 when the C++ kernel is built and loaded; "varlen" on CUDA
    when FlashAttention runs this (dtype, block_size, (H, K, d) `heads`); else "sdpa"."""
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
    return "sdpa"


# What one more decode group costs (its gather, SDPA and scatter calls), in padded key rows: a
# group is split off when that saves more padding than this. CPU: tuned with
# benchmarks/attention.py (1 padded call -> groups: 10.9x faster for 1x4096 + 31x256 tokens,
# 5x for 32 spread over 64..2016, equal for 32x512). CUDA: a launch-bound estimate, not yet
# measured (~5 kernels of ~5 us against ~2 ns to gather a row), so it only splits big gaps.
GROUP_COST_ROWS = {"cpu": 256, "cuda": 32768}
# "kernel" backend: sequences with more new tokens than this take SDPA (one kernel tile is 16 rows;
# past it SDPA's blocked products win: 512 rows over 1024 keys took ~2x longer in the kernel).
KERNEL_MAX_QUERY = 16


def group_by_length(lens: list[int], group_cost: int) -> list[list[int]]:
    """Partition sequence indices into groups of similar `lens`, minimising
    sum(group_cost + len(group) * max(group lens)) over partitions of the length-sorted order.
    Groups come longest first, members in batch order.

    Exact: best[e] = min_j best[j] + group_cost + (e - j) * lens[e - 1] is a minimum over lines
    of slope -j evaluated at non-decreasing x = lens[e - 1], so a monotone convex hull of those
    lines answers each end point in amortised O(1) (the convex hull trick), O(n log n) in all.
    Ties keep the earlier start (larger groups), as an argmin over starts would.
    """
    # follows https://cp-algorithms.com/geometry/convex_hull_trick.html
    num = len(lens)
    order = sorted(range(num), key=lens.__getitem__)  # stable, ascending length
    sorted_lens = [lens[i] for i in order]
    if not num or num * sorted_lens[-1] - sum(sorted_lens) <= group_cost:
        return [list(range(num))] if num else []  # padding costs less than a second group
    best = [0] * (num + 1)  # best[j]: cost of the first j sorted sequences
    cut = [0] * (num + 1)
    slopes: list[int] = []  # hull lines y = intercepts[i] + slopes[i] * x, slopes decreasing
    intercepts: list[int] = []
    starts: list[int] = []
    ptr = 0
    for end in range(1, num + 1):
        slope, intercept = -(end - 1), best[end - 1]
        while len(slopes) >= 2 and (intercept - intercepts[-2]) * (slopes[-2] - slopes[-1]) < (
            intercepts[-1] - intercepts[-2]
        ) * (slopes[-2] - slope):
            slopes.pop(), intercepts.pop(), starts.pop()
        slopes.append(slope), intercepts.append(intercept), starts.append(end - 1)
        ptr = min(ptr, len(slopes) - 1)
        x = sorted_lens[end - 1]
        while ptr + 1 < len(slopes) and (
            intercepts[ptr + 1] + slopes[ptr + 1] * x < intercepts[ptr] + slopes[ptr] * x
        ):
            ptr += 1
        cut[end] = starts[ptr]
        best[end] = intercepts[ptr] + slopes[ptr] * x + group_cost + end * x
    groups: list[list[int]] = []
    end = num
    while end > 0:
        groups.append(sorted(order[cut[end] : end]))  # rows in batch order
        end = cut[end]
    return groups


class _GroupMemo:
    """The latest `group_by_length` answers, keyed by lengths relative to their minimum.

    A steady decode step adds 1 to every length: each partition's cost then grows by exactly the
    number of sequences, and every comparison the convex hull trick makes is translation
    invariant, so the answer (ties included) is the same and is reused instead of recomputed.
    Several answers are kept: with pipeline stages the micro-batches take turns (each repeats
    every pp_size steps), and stages that share a process interleave theirs.
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._groups: dict[tuple[bytes, int], list[np.ndarray]] = {}

    def groups_for(self, lens: np.ndarray, group_cost: int) -> list[np.ndarray]:
        key = ((lens - lens.min()).tobytes(), group_cost)
        groups = self._groups.get(key)
        if groups is None:
            if len(self._groups) >= self.capacity:
                del self._groups[next(iter(self._groups))]  # the oldest answer
            groups = [
                np.asarray(g, dtype=np.int64) for g in group_by_length(lens.tolist(), group_cost)
            ]
            self._groups[key] = groups
        return groups


_GROUPS = _GroupMemo()


def _sequence_slots(
    block_table: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Cache slots of `positions` through a block table [..., max_num_blocks] -> [..., len]."""
    blocks = block_table[..., positions // block_size]  # [..., len]
    return blocks * block_size + positions % block_size  # [..., len]


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
            prefills.append(_prefill_span(tables[seq_id], row, q_len, s_len, attn.block_size))
        decode_ids = np.flatnonzero(is_decode)  # [n]
    else:
        decode_ids = np.arange(len(query_lens))  # [n]
    groups: list[DecodeGroup] = []
    if len(decode_ids):
        host_tables = attn.host_block_tables
        if host_tables is None:
            host_tables = attn.block_tables.cpu().numpy()  # [num_seqs, max_num_blocks]
        lens = seq_lens[decode_ids]  # [n]
        group_cost = GROUP_COST_ROWS.get(torch.device(device).type, GROUP_COST_ROWS["cuda"])
        for members in _GROUPS.groups_for(lens, group_cost):
            groups.append(
                _decode_group(
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
            else _prefill_span(table, row, q_len, s_len, attn.block_size)
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


def _decode_group(
    tables: np.ndarray,
    seq_ids: np.ndarray,
    rows: np.ndarray,
    lens: np.ndarray,
    block_size: int,
    device: torch.device | str,
) -> DecodeGroup:
    """Index tensors of one group from host arrays: tables [S, max_num_blocks], the rest [g]."""
    max_len = int(lens.max())
    num_blocks = -(-max_len // block_size)
    blocks = tables[seq_ids, :num_blocks]  # [g, num_blocks]
    offsets = np.arange(block_size)  # [block_size]
    slots_np = (blocks[:, :, None] * block_size + offsets).reshape(len(seq_ids), -1)
    slots = torch.from_numpy(slots_np[:, :max_len])  # [g, max_seq_len]
    mask = None
    if int(lens.min()) != max_len:
        padded = np.arange(max_len)[None, :] < lens[:, None]  # [g, max_seq_len]
        mask = torch.from_numpy(padded[:, None, None, :]).to(device)  # [g, 1, 1, max_len]
    rows_t = torch.from_numpy(np.ascontiguousarray(rows)).to(device)  # [g]
    return DecodeGroup(rows_t, slots.to(device), mask)


def _prefill_span(
    table: torch.Tensor, row: int, q_len: int, s_len: int, block_size: int
) -> PrefillSpan:
    if q_len == s_len:
        return PrefillSpan(row, q_len, s_len, key_slots=None, mask=None)
    device = table.device
    key_pos = torch.arange(s_len, device=device)  # [seq_len]
    query_pos = torch.arange(s_len - q_len, s_len, device=device)  # [query_len]
    mask = key_pos[None, :] <= query_pos[:, None]  # [query_len, seq_len]
    slots = _sequence_slots(table, key_pos, block_size)  # [seq_len]
    return PrefillSpan(row, q_len, s_len, key_slots=slots, mask=mask)


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
    if plan.decode_only:  # one group, every row in order
        return _decode_attention(q, flat, plan.decode_groups[0], scale, gqa=gqa)  # [T, H, d]
    out = q.new_empty(q.shape)  # [T, H, d]
    for group in plan.decode_groups:
        out[group.rows] = _decode_attention(q, flat, group, scale, gqa=gqa)  # [g, H, d]
    for span in plan.prefills:
        rows = slice(span.row_start, span.row_start + span.query_len)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], flat, span, scale=scale, gqa=gqa)
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
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], flat, span, scale=scale, gqa=gqa)
    return out


def _decode_attention(
    q: torch.Tensor, flat: torch.Tensor, group: DecodeGroup, scale: float, *, gqa: bool
) -> torch.Tensor:
    """One SDPA call for a group of one-query sequences, keys padded to its longest one."""
    query = q[group.rows][:, :, None, :]  # [g, H, 1, d]
    keys = flat[0][group.slots].transpose(1, 2)  # [g, K, max_seq_len, d]
    values = flat[1][group.slots].transpose(1, 2)  # [g, K, max_seq_len, d]
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=group.mask, scale=scale, enable_gqa=gqa
    )  # [g, H, 1, d]
    return out[:, :, 0, :]  # [g, H, d]


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    flat: torch.Tensor | None,
    span: PrefillSpan,
    *,
    scale: float,
    gqa: bool,
) -> torch.Tensor:
    """Causal attention of one sequence's query rows q [Q, H, d] -> [Q, H, d]."""
    query = q.transpose(0, 1)[None]  # [1, H, Q, d]
    if span.key_slots is None:
        # No cached prefix: the fresh k/v are the whole context (same values the cache now holds).
        keys = k.transpose(0, 1)[None]  # [1, K, Q, d]
        values = v.transpose(0, 1)[None]  # [1, K, Q, d]
        out = F.scaled_dot_product_attention(
            query, keys, values, is_causal=True, scale=scale, enable_gqa=gqa
        )  # [1, H, Q, d]
    else:
        keys = flat[0][span.key_slots].transpose(0, 1)[None]  # [1, K, S, d]
        values = flat[1][span.key_slots].transpose(0, 1)[None]  # [1, K, S, d]
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=span.mask, scale=scale, enable_gqa=gqa
        )  # [1, H, Q, d]
    return out[0].transpose(0, 1)  # [Q, H, d]
