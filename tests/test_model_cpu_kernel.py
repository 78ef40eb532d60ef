"""The fused C++ CPU paged-attention kernel against the grouped-SDPA path and a dense reference."""

from __future__ import annotations

import random

import pytest
import torch

from internvl_core.model import attention, cpu_kernels
from internvl_core.model.attention import paged_attention, plan_attention, write_kv
from internvl_core.model.attention_metadata import AttentionMetadata

pytestmark = pytest.mark.skipif(
    not cpu_kernels.load_cpu_kernels(), reason="no C++ compiler: the kernel is not built"
)

# (H, K, d): Qwen2-0.5B-like GQA 7:1, InternLM2 GQA 4:1, Phi-3 MHA, 76B-like GQA 8:1 at d 128,
# MHA 8:8 at d 64 (decode jobs over every KV head), GQA 3:1 (3 rows per KV head), d 80 and the
# tiny models' d 16 (the other compiled head dims), d 24 (the scalar path for head dims that are
# not a multiple of 16).
SHAPES = [
    (14, 2, 64),
    (8, 2, 32),
    (4, 4, 32),
    (16, 2, 128),
    (8, 8, 64),
    (12, 4, 64),
    (6, 2, 80),
    (2, 1, 16),
    (4, 2, 24),
]
BLOCK_SIZE = 16


def _batch(
    heads: int,
    kv_heads: int,
    head_dim: int,
    query_lens: list[int],
    seq_lens: list[int],
    seed: int,
    block_size: int = BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random q/k/v and a random pool whose blocks are shuffled across sequences."""
    gen = torch.Generator().manual_seed(seed)
    needed = sum(-(-s // block_size) for s in seq_lens)
    perm = (torch.randperm(needed + 8, generator=gen) + 1).tolist()  # block 0 never used
    tables, used = [], 0
    for s_len in seq_lens:
        count = -(-s_len // block_size)
        tables.append(perm[used : used + count])
        used += count
    attn = AttentionMetadata.for_contiguous(query_lens, seq_lens, tables, block_size)
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, head_dim, generator=gen)  # [T, H, d]
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen)  # [T, K, d]
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen)  # [T, K, d]
    cache = torch.randn(2, needed + 9, block_size, kv_heads, head_dim, generator=gen)
    return q, k, v, cache, attn


def _both(q, k, v, cache, attn) -> tuple[torch.Tensor, torch.Tensor]:
    scale = q.shape[-1] ** -0.5
    sdpa = plan_attention(attn, "cpu", backend="sdpa")
    fused = plan_attention(attn, "cpu", torch.float32)
    assert fused.kernel is not None or all(s.query_len > 1 for s in fused.prefills)
    want = paged_attention(q, k, v, cache.clone(), attn, scale, plan=sdpa)  # [T, H, d]
    got = paged_attention(q, k, v, cache.clone(), attn, scale, plan=fused)  # [T, H, d]
    return want, got


@pytest.mark.parametrize("kernel_max_query", [16, 10_000])
@pytest.mark.parametrize("shape", SHAPES)
def test_mixed_batch_matches_sdpa(
    shape: tuple[int, int, int], kernel_max_query: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decodes at and across block edges, a fresh prompt, chunks over a cached prefix, a
    one-token sequence; with every chunk in the kernel too (tiles of 16 rows, transposed keys)."""
    monkeypatch.setattr(attention, "KERNEL_MAX_QUERY", kernel_max_query)
    query_lens = [1, 1, 1, 1, 1, 40, 7, 33, 1]
    seq_lens = [1, 16, 17, 300, 129, 40, 100, 90, 64]
    want, got = _both(*_batch(*shape, query_lens, seq_lens, seed=1))
    assert (want - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("shape", [(8, 8, 64), (12, 4, 64), (16, 2, 128)])
def test_other_block_sizes_match_sdpa(shape: tuple[int, int, int], block_size: int) -> None:
    """Blocks shorter than a 16-key chunk, and two chunks per block."""
    query_lens = [1, 1, 1, 1, 5, 12]
    seq_lens = [1, 9, 33, 250, 70, 200]
    batch = _batch(*shape, query_lens, seq_lens, seed=6, block_size=block_size)
    want, got = _both(*batch)
    assert (want - got).abs().max().item() <= 1e-5


def test_decode_jobs_split_heads_across_threads() -> None:
    """One or two decode sequences: their KV heads are split into several jobs; same answer."""
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 8):
            torch.set_num_threads(count)
            batch = _batch(8, 8, 64, [1, 1], [300, 41], seed=7)
            want, got = _both(*batch)
            assert (want - got).abs().max().item() <= 1e-5, count
    finally:
        torch.set_num_threads(threads)


def test_random_batches_match_sdpa() -> None:
    rng = random.Random(0)
    for trial in range(12):
        heads, kv_heads, head_dim = rng.choice(SHAPES)
        query_lens, seq_lens = [], []
        for _ in range(rng.randint(1, 24)):
            seq_len = rng.randint(1, 400)
            query_lens.append(rng.choice([1, 1, 1, rng.randint(1, seq_len)]))
            seq_lens.append(seq_len)
        batch = _batch(heads, kv_heads, head_dim, query_lens, seq_lens, seed=trial)
        want, got = _both(*batch)
        assert (want - got).abs().max().item() <= 1e-5, (trial, query_lens, seq_lens)


def test_decode_only_batch_is_one_kernel_call() -> None:
    _, _, _, _, attn = _batch(8, 2, 32, [1] * 5, [3, 70, 16, 33, 200], seed=3)
    plan = plan_attention(attn, "cpu", torch.float32)
    assert plan.kernel is not None and not plan.prefills and not plan.decode_groups
    assert plan.kernel.seq_lens.tolist() == [3, 70, 16, 33, 200]


def test_kernel_reads_the_cache_not_the_fresh_kv() -> None:
    """A decode row's keys come from the pool: after write_kv the two must agree exactly."""
    q, k, v, cache, attn = _batch(4, 4, 32, [1, 1], [5, 20], seed=4)
    write_kv(k, v, cache, attn.slot_mapping)
    scale = 32**-0.5
    plan = plan_attention(attn, "cpu", torch.float32)
    first = paged_attention(q, k, v, cache, attn, scale, plan=plan)
    again = paged_attention(q, k * 0, v * 0, cache.clone(), attn, scale, plan=plan)
    assert not torch.equal(first, again)  # the new token's k/v were overwritten with zeros


def test_bad_block_id_raises() -> None:
    q, _, _, cache, attn = _batch(4, 4, 32, [1], [20], seed=5)
    plan = plan_attention(attn, "cpu", torch.float32)
    plan.kernel.block_tables[0, 1] = cache.shape[1] + 5
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="block id outside the pool"):
        torch.ops.internvl_cpu.paged_attention(
            q,
            cache,
            plan.kernel.block_tables,
            plan.kernel.query_start,
            plan.kernel.query_lens,
            plan.kernel.seq_lens,
            0.1,
            out,
        )


def test_other_dtypes_and_devices_take_sdpa() -> None:
    from internvl_core.model.attention import choose_backend

    assert choose_backend("cpu", torch.float32) == "kernel"
    assert choose_backend("cpu", torch.bfloat16) == "sdpa"
    assert choose_backend("cpu", None) == "sdpa"
    assert choose_backend("meta", torch.float32) == "sdpa"
