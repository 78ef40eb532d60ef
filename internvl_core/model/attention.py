"""Paged attention over block tables: write new K/V into their cache slots, then attend causally.

Decode rows are attended in groups of similar context length (one SDPA call each), so a long
sequence does not pad every short one in the batch to its length.

q [T, H, d], k/v [T, K, d], a layer's cache [2, num_blocks, block_size, K, d], AttentionMetadata
-> output [T, H, d]. Torch SDPA backend (CPU and GPU); `paged_attention` is the one entry point,
so a faster GPU kernel can be dispatched behind it later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from internvl_core.model.attention_metadata import AttentionMetadata


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
class AttentionPlan:
    """Index tensors derived once per forward from AttentionMetadata and shared by every layer."""

    decode_groups: list[DecodeGroup]
    prefills: list[PrefillSpan]
    decode_only: bool  # one group holding every token row in order: the output needs no scatter


# What one more decode group costs (its gather, SDPA and scatter calls), in padded key rows: a
# group is split off when that saves more padding than this. CPU: tuned with
# benchmarks/attention.py (1 padded call -> groups: 10.9x faster for 1x4096 + 31x256 tokens,
# 5x for 32 spread over 64..2016, equal for 32x512). CUDA: a launch-bound estimate, not yet
# measured (~5 kernels of ~5 us against ~2 ns to gather a row), so it only splits big gaps.
GROUP_COST_ROWS = {"cpu": 256, "cuda": 32768}


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


def _sequence_slots(
    block_table: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Cache slots of `positions` through a block table [..., max_num_blocks] -> [..., len]."""
    blocks = block_table[..., positions // block_size]  # [..., len]
    return blocks * block_size + positions % block_size  # [..., len]


def plan_attention(attn: AttentionMetadata, device: torch.device | str) -> AttentionPlan:
    """Split the batch into decode rows (one batched call) and prefill spans (one call each)."""
    tables = attn.block_tables.to(device)  # [num_seqs, max_num_blocks]
    decode_seq_ids: list[int] = []
    decode_rows: list[int] = []
    prefills: list[PrefillSpan] = []
    row = 0
    for seq_id, (q_len, s_len) in enumerate(zip(attn.query_lens, attn.seq_lens, strict=True)):
        assert 1 <= q_len <= s_len, f"sequence {seq_id}: query_len {q_len}, seq_len {s_len}"
        if q_len == 1:
            decode_seq_ids.append(seq_id)
            decode_rows.append(row)
        else:
            prefills.append(_prefill_span(tables[seq_id], row, q_len, s_len, attn.block_size))
        row += q_len
    lens = [attn.seq_lens[i] for i in decode_seq_ids]
    group_cost = GROUP_COST_ROWS.get(torch.device(device).type, GROUP_COST_ROWS["cuda"])
    members = group_by_length(lens, group_cost) if lens else []
    groups = [
        _decode_group(
            tables,
            [decode_seq_ids[m] for m in group],
            [decode_rows[m] for m in group],
            [lens[m] for m in group],
            attn.block_size,
        )
        for group in members
    ]
    # A lone group of every row (members in batch order) needs no scatter.
    return AttentionPlan(groups, prefills, decode_only=not prefills and len(groups) == 1)


def _decode_group(
    tables: torch.Tensor, seq_ids: list[int], rows: list[int], lens: list[int], block_size: int
) -> DecodeGroup:
    device = tables.device
    max_len = max(lens)
    positions = torch.arange(max_len, device=device)  # [max_seq_len]
    ids = torch.tensor(seq_ids, dtype=torch.long, device=device)  # [g]
    slots = _sequence_slots(tables[ids], positions, block_size)  # [g, max_seq_len]
    mask = None
    if min(lens) != max_len:
        lengths = torch.tensor(lens, device=device)  # [g]
        mask = (positions[None, :] < lengths[:, None])[:, None, None, :]  # [g, 1, 1, max_len]
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)  # [g]
    return DecodeGroup(rows_t, slots, mask)


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
        plan = plan_attention(attn, q.device)
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
    flat: torch.Tensor,
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
