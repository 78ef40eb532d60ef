"""Triton paged decode attention vs the pure-torch `decode_attention` and the SDPA backend.

On CUDA the kernels run compiled in bf16. Without CUDA they run in Triton's interpreter
(`TRITON_INTERPRET=1`, set by conftest) in fp32, exact to 1e-5; they skip without Triton (it comes
with xgrammar here; CUDA builds of torch ship it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from internvl_core.model.attention import paged_attention, plan_attention
from internvl_core.model.attention_metadata import AttentionMetadata
from internvl_core.model.decode_attention import decode_attention
from internvl_core.model.triton_decode_attention import (
    MIN_PART_KEYS,
    num_partitions,
    paged_decode_attention,
    triton_available,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
# (H, K, d, block_size, seq lens): GQA 4:1 and 8:1, MHA at d 96 (Phi-3), odd groups, long rows.
CASES = [
    (8, 2, 32, 16, [1, 5, 40, 130]),
    (8, 8, 64, 16, [300, 17, 1]),
    (12, 4, 96, 32, [77, 200]),
    (7, 1, 32, 16, [600, 3]),
]


@pytest.fixture(scope="module")
def device() -> str:
    """CUDA when there is one, else the CPU through Triton's interpreter (conftest sets
    TRITON_INTERPRET=1 before anything imports triton)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _random_case(
    heads: int, kv_heads: int, head_dim: int, block_size: int, lens: list[int], device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(lens) + heads)
    num_blocks = 64
    width = max(-(-n // block_size) for n in lens) + 1  # one spare column past the longest
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    tables = torch.randint(0, num_blocks, (len(lens), width), generator=gen)  # [B, W]
    q = torch.randn(len(lens), heads, head_dim, generator=gen)  # [B, H, d]
    return q.to(device), cache.to(device), tables.to(device), torch.tensor(lens, device=device)


def test_partitions_follow_keys_and_sms() -> None:
    assert num_partitions(1, 8, MIN_PART_KEYS, num_sms=132) == 1  # one partition's worth of keys
    assert num_partitions(1, 8, 2048, num_sms=132) == 2048 // MIN_PART_KEYS
    assert num_partitions(128, 8, 2048, num_sms=132) == 1  # the batch fills the chip already
    assert num_partitions(4, 8, 8192, num_sms=132) == 9  # ~2 programs per SM


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_matches_decode_attention(device: str, case: tuple) -> None:
    heads, kv_heads, head_dim, block_size, lens = case
    q, cache, tables, seq_lens = _random_case(heads, kv_heads, head_dim, block_size, lens, device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, cache = q.to(dtype), cache.to(dtype)
    want = decode_attention(q.float(), cache.float(), tables, seq_lens, head_dim**-0.5)
    got = paged_decode_attention(q, cache, tables, seq_lens, head_dim**-0.5)
    assert got.dtype == dtype and got.shape == q.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want).abs().max().item() <= tolerance


def _mixed_batch(device: str, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    block_size = 16
    query_lens = [1, 1, 40, 1, 9, 1]  # decodes, a fresh prompt, a chunk over a cached prefix
    seq_lens = [1, 150, 40, 333, 60, 17]
    rng = np.random.default_rng(3)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 1
    ids = rng.permutation(num_blocks - 1) + 1  # shuffled blocks, block 0 unused
    tables, start = [], 0
    for n in seq_lens:
        count = -(-n // block_size)
        tables.append(ids[start : start + count].tolist())
        start += count
    attn = AttentionMetadata.for_contiguous(query_lens, seq_lens, tables, block_size, device=device)
    gen = torch.Generator().manual_seed(4)
    tokens = sum(query_lens)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    q = torch.randn(tokens, heads, head_dim, generator=gen)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    return attn, *(t.to(device=device, dtype=dtype) for t in (cache, q, k, v))


@needs_triton
@pytest.mark.parametrize("shape", [(8, 2, 32), (4, 4, 64)])
def test_triton_backend_matches_sdpa_on_a_mixed_batch(device: str, shape: tuple) -> None:
    heads, kv_heads, head_dim = shape
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    attn, cache, q, k, v = _mixed_batch(device, heads, kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    triton_plan = plan_attention(attn, device, backend="triton")
    assert triton_plan.paged_decode is not None and len(triton_plan.prefills) == 2
    got = paged_attention(q, k, v, cache.clone(), attn, scale, plan=triton_plan)
    want = paged_attention(
        q, k, v, cache.clone(), attn, scale, plan=plan_attention(attn, device, backend="sdpa")
    )
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want.float()).abs().max().item() <= tolerance


def test_triton_plan_holds_every_decode_row() -> None:
    """Planning needs no Triton: decode rows, their tables cut to the longest, seq lens."""
    attn, *_ = _mixed_batch("cpu", 4, 2, 16, torch.float32)
    plan = plan_attention(attn, "cpu", backend="triton")
    rows = plan.paged_decode
    assert rows is not None and not plan.decode_only
    assert rows.rows.tolist() == [0, 1, 42, 52]  # token rows of the one-query sequences
    assert rows.seq_lens.tolist() == [1, 150, 333, 17]
    assert rows.block_tables.shape == (4, -(-333 // 16))
    assert torch.equal(rows.block_tables[1, :10], attn.block_tables[1, :10])  # 150 keys: 10 blocks
    decode_only = AttentionMetadata.for_contiguous([1, 1], [5, 20], [[3], [4, 5]], 16)
    assert plan_attention(decode_only, "cpu", backend="triton").decode_only


@pytest.mark.gpu
def test_engine_backend_is_triton_or_varlen_on_cuda() -> None:
    from internvl_core.model.attention import choose_backend

    backend = choose_backend("cuda", torch.bfloat16, block_size=16, heads=(32, 8, 128))
    assert backend in ("varlen", "triton")
