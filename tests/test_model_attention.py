"""paged_attention: cache writes via slot_mapping; decode and mixed batches vs dense attention."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from internvl_core.model import sdpa_attention
from internvl_core.model.attention import paged_attention, plan_attention, write_kv
from internvl_core.model.attention_metadata import AttentionMetadata

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
BLOCK_SIZE, NUM_BLOCKS = 4, 24
SCALE = HEAD_DIM**-0.5


def _dense_causal(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Reference: q [Q, H, d] over keys/values [S, K, d]; row i sits at position S - Q + i."""
    num_q, seq_len = q.shape[0], keys.shape[0]
    group = HEADS // KV_HEADS
    k = keys.repeat_interleave(group, dim=1)  # [S, H, d]
    v = values.repeat_interleave(group, dim=1)  # [S, H, d]
    scores = torch.einsum("qhd,shd->hqs", q, k) * SCALE  # [H, Q, S]
    query_pos = torch.arange(seq_len - num_q, seq_len)[:, None]  # [Q, 1]
    allowed = torch.arange(seq_len)[None, :] <= query_pos  # [Q, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)  # [Q, H, d]


def _run_batch(
    query_lens: list[int], seq_lens: list[int], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor, AttentionMetadata]:
    """Random sequences with their cached prefixes written beforehand, non-contiguous blocks."""
    perm = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, used = [], 0
    for s_len in seq_lens:
        count = -(-s_len // BLOCK_SIZE)
        tables.append(perm[used : used + count])
        used += count
    kv_cache = torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    full_k = [torch.randn(s, KV_HEADS, HEAD_DIM, generator=gen) for s in seq_lens]
    full_v = [torch.randn(s, KV_HEADS, HEAD_DIM, generator=gen) for s in seq_lens]
    cached = [s - q for q, s in zip(query_lens, seq_lens, strict=True)]
    prefix = AttentionMetadata.for_contiguous(cached, cached, tables, BLOCK_SIZE)
    if sum(cached):
        k_prev = torch.cat([k[:c] for k, c in zip(full_k, cached, strict=True)])  # [P, K, d]
        v_prev = torch.cat([v[:c] for v, c in zip(full_v, cached, strict=True)])  # [P, K, d]
        write_kv(k_prev, v_prev, kv_cache, prefix.slot_mapping)
    attn = AttentionMetadata.for_contiguous(query_lens, seq_lens, tables, BLOCK_SIZE)
    q = torch.randn(sum(query_lens), HEADS, HEAD_DIM, generator=gen)  # [T, H, d]
    k_new = torch.cat([k[c:] for k, c in zip(full_k, cached, strict=True)])  # [T, K, d]
    v_new = torch.cat([v[c:] for v, c in zip(full_v, cached, strict=True)])  # [T, K, d]
    out = paged_attention(q, k_new, v_new, kv_cache, attn, SCALE)
    expected = []
    row = 0
    for q_len, k, v in zip(query_lens, full_k, full_v, strict=True):
        expected.append(_dense_causal(q[row : row + q_len], k, v))
        row += q_len
    return out, torch.cat(expected), [full_k, full_v], kv_cache, attn


def test_mixed_prefill_and_decode_matches_dense() -> None:
    gen = torch.Generator().manual_seed(0)
    # fresh prefill, decode, chunked prefill over a cached prefix, short decode, fresh prefill
    query_lens = [7, 1, 5, 1, 3]
    seq_lens = [7, 10, 13, 3, 3]
    out, expected, _, _, _ = _run_batch(query_lens, seq_lens, gen)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_decode_only_batch_matches_dense() -> None:
    gen = torch.Generator().manual_seed(1)
    out, expected, _, _, attn = _run_batch([1, 1, 1], [9, 1, 17], gen)
    assert attn.is_decode_only
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cache_holds_every_token_at_its_slot() -> None:
    gen = torch.Generator().manual_seed(2)
    _, _, (full_k, full_v), kv_cache, attn = _run_batch([4, 1], [6, 5], gen)
    for seq, table in enumerate(attn.block_tables.tolist()):
        for pos in range(attn.seq_lens[seq]):
            block, offset = table[pos // BLOCK_SIZE], pos % BLOCK_SIZE
            torch.testing.assert_close(kv_cache[0, block, offset], full_k[seq][pos])
            torch.testing.assert_close(kv_cache[1, block, offset], full_v[seq][pos])


def test_plan_splits_decode_rows_and_prefill_spans() -> None:
    attn = AttentionMetadata.for_contiguous([3, 1, 2], [3, 6, 8], [[0], [1, 2], [3, 4]], 4)
    plan = plan_attention(attn, "cpu")
    [group] = plan.decode_groups
    assert group.rows.tolist() == [3]
    assert group.slots.tolist() == [[4, 5, 6, 7, 8, 9]]
    assert group.mask is None  # one length: nothing padded
    assert [(s.row_start, s.query_len, s.seq_len) for s in plan.prefills] == [(0, 3, 3), (4, 2, 8)]
    assert plan.prefills[0].key_slots is None
    assert plan.prefills[1].key_slots.tolist() == [12, 13, 14, 15, 16, 17, 18, 19]
    assert not plan.decode_only


def test_multi_query_heads_equal_kv_heads() -> None:
    """MHA (Phi-3 style, H == K) goes through the same path without GQA."""
    gen = torch.Generator().manual_seed(3)
    kv_cache = torch.zeros(2, 4, BLOCK_SIZE, HEADS, HEAD_DIM)
    attn = AttentionMetadata.for_contiguous([6], [6], [[2, 0]], BLOCK_SIZE)
    q = torch.randn(6, HEADS, HEAD_DIM, generator=gen)  # [T, H, d]
    k = torch.randn(6, HEADS, HEAD_DIM, generator=gen)  # [T, H, d]
    v = torch.randn(6, HEADS, HEAD_DIM, generator=gen)  # [T, H, d]
    out = paged_attention(q, k, v, kv_cache, attn, SCALE)
    scores = torch.einsum("qhd,shd->hqs", q, k) * SCALE  # [H, T, T]
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # [H, T, T]
    torch.testing.assert_close(out, torch.einsum("hqs,shd->qhd", probs, v), atol=1e-5, rtol=1e-5)


def _partition_cost(groups: list[list[int]], lens: list[int], group_cost: int) -> int:
    return sum(group_cost + len(g) * max(lens[i] for i in g) for g in groups)


@pytest.mark.parametrize("seed", range(20))
def test_group_by_length_is_an_optimal_partition(seed: int) -> None:
    rng = random.Random(seed)
    lens = [
        rng.choice([rng.randint(1, 40), rng.randint(200, 600)]) for _ in range(rng.randint(1, 8))
    ]
    group_cost = rng.choice([0, 16, 100, 10_000])
    groups = sdpa_attention.group_by_length(lens, group_cost)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    assert all(g == sorted(g) for g in groups)  # batch order inside a group
    # Every partition of the length-sorted order into contiguous runs, by brute force.
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    best = min(
        _partition_cost(
            [order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))], lens, group_cost
        )
        for r in range(len(order))
        for cuts in itertools.combinations(range(1, len(order)), r)
    )
    assert _partition_cost(groups, lens, group_cost) == best


def test_group_by_length_splits_a_long_context_from_short_ones() -> None:
    lens = [256, 4096, 256, 256]
    assert sdpa_attention.group_by_length(lens, group_cost=256) == [[1], [0, 2, 3]]
    assert sdpa_attention.group_by_length([512] * 4, group_cost=256) == [[0, 1, 2, 3]]
    assert sdpa_attention.group_by_length(lens, group_cost=10**9) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("group_cost", [0, 10**9])
def test_decode_groups_equal_one_sequence_at_a_time(group_cost: int) -> None:
    """Mixed context lengths in one decode step: each row equals its sequence attended alone,
    whether the rows are split into many groups or padded into one."""
    gen = torch.Generator().manual_seed(11)
    seq_lens = [3, 30, 5, 17, 1, 30]
    tables = [[i * 8 + b for b in range(8)] for i in range(len(seq_lens))]
    kv_cache = torch.randn(2, 8 * len(seq_lens), BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=gen)
    q = torch.randn(len(seq_lens), HEADS, HEAD_DIM, generator=gen)  # [T, H, d]
    k = torch.randn(len(seq_lens), KV_HEADS, HEAD_DIM, generator=gen)  # [T, K, d]
    v = torch.randn(len(seq_lens), KV_HEADS, HEAD_DIM, generator=gen)  # [T, K, d]
    attn = AttentionMetadata.for_contiguous([1] * len(seq_lens), seq_lens, tables, BLOCK_SIZE)
    saved = dict(sdpa_attention.GROUP_COST_ROWS)
    sdpa_attention.GROUP_COST_ROWS["cpu"] = group_cost
    try:
        plan = plan_attention(attn, "cpu")
        out = paged_attention(q, k, v, kv_cache.clone(), attn, SCALE, plan=plan)
    finally:
        sdpa_attention.GROUP_COST_ROWS.update(saved)
    assert len(plan.decode_groups) == (1 if group_cost else len(set(seq_lens)))
    for i, n in enumerate(seq_lens):
        alone = AttentionMetadata.for_contiguous([1], [n], [tables[i]], BLOCK_SIZE)
        want = paged_attention(
            q[i : i + 1], k[i : i + 1], v[i : i + 1], kv_cache.clone(), alone, SCALE
        )
        torch.testing.assert_close(out[i : i + 1], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_group_memo_equals_a_fresh_grouping_after_every_shift(seed: int) -> None:
    """Reusing the grouping when every length grew by the same amount (a steady decode step)
    gives exactly what `group_by_length` computes afresh, ties included."""
    rng = random.Random(seed)
    lens = [rng.choice([rng.randint(1, 40), rng.randint(200, 600)]) for _ in range(40)]
    memo = sdpa_attention.GroupMemo()
    for shift in (0, 1, 2, 7, 300):
        shifted = np.array(lens, dtype=np.int64) + shift
        groups = [g.tolist() for g in memo.groups_for(shifted, 256)]
        assert groups == sdpa_attention.group_by_length(shifted.tolist(), 256)
    assert len(memo._groups) == 1, "every shift reused the first answer"


def test_group_memo_keeps_the_answers_of_alternating_micro_batches() -> None:
    """Pipeline micro-batches take turns: each one's grouping is reused on its next step, and
    the memo stays bounded."""
    memo = sdpa_attention.GroupMemo(capacity=2)
    first = np.array([5, 300, 7, 290], dtype=np.int64)
    second = np.array([40, 41, 600], dtype=np.int64)
    answers = [memo.groups_for(first, 256), memo.groups_for(second, 256)]
    assert memo.groups_for(first + 1, 256) is answers[0]
    assert memo.groups_for(second + 1, 256) is answers[1]
    memo.groups_for(np.array([1, 900], dtype=np.int64), 256)
    assert len(memo._groups) == 2, "the oldest answer made room"
