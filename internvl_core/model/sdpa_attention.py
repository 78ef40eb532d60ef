"""The SDPA attention path: decode rows in groups of similar length, one call per prefill span.

Decode rows are grouped by context length (`group_by_length`, memoised across steady decode
steps by `GroupMemo`), their keys gathered through cache slots and padded to the group's longest;
each prefill span (a fresh prompt, or a chunk over a cached prefix) is one causal SDPA call.
`attention.paged_attention` dispatches here for the "sdpa" backend, for the fresh prompts of the
CPU "kernel" backend and for the prefill spans of the CUDA "triton" backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


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


class GroupMemo:
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


GROUPS = GroupMemo()


def sequence_slots(
    block_table: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Cache slots of `positions` through a block table [..., max_num_blocks] -> [..., len]."""
    blocks = block_table[..., positions // block_size]  # [..., len]
    return blocks * block_size + positions % block_size  # [..., len]


def decode_group(
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


def prefill_span(
    table: torch.Tensor, row: int, q_len: int, s_len: int, block_size: int
) -> PrefillSpan:
    if q_len == s_len:
        return PrefillSpan(row, q_len, s_len, key_slots=None, mask=None)
    device = table.device
    key_pos = torch.arange(s_len, device=device)  # [seq_len]
    query_pos = torch.arange(s_len - q_len, s_len, device=device)  # [query_len]
    mask = key_pos[None, :] <= query_pos[:, None]  # [query_len, seq_len]
    slots = sequence_slots(table, key_pos, block_size)  # [seq_len]
    return PrefillSpan(row, q_len, s_len, key_slots=slots, mask=mask)


def sdpa_decode(
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


def sdpa_prefill(
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
