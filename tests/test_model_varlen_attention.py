"""CUDA varlen paged attention (FlashAttention through torch.nn.attention.varlen) vs SDPA.

Both paths run in bf16 on the same cache; they differ by kernel rounding only. The engine path is
covered too: a bf16 decoder's greedy tokens with the varlen backend equal the SDPA backend's.
"""

from __future__ import annotations

import pytest
import torch

from internvl_core.model.attention import paged_attention, plan_attention, write_kv
from internvl_core.model.attention_metadata import AttentionMetadata
from internvl_core.model.varlen_attention import varlen_has_paging, varlen_supported

pytestmark = pytest.mark.gpu
BLOCK_SIZES = (16, 32, 64, 128, 256)
# (H, K, d): InternVL2-8B's InternLM2.5 (GQA 4:1), the 76B's Llama-3 (8:1), Phi-3 MHA at d 96.
SHAPES = [(32, 8, 128), (64, 8, 128), (32, 32, 96)]


def _supported_block_sizes(shape: tuple[int, int, int]) -> list[int]:
    return [bs for bs in BLOCK_SIZES if varlen_supported("cuda", torch.bfloat16, bs, *shape)]


def test_some_block_size_is_supported() -> None:
    if not varlen_has_paging():
        pytest.skip(f"torch {torch.__version__}'s varlen_attn has no block_table (torch 2.13)")
    assert _supported_block_sizes(SHAPES[0]), "varlen attention refused every block size"


@pytest.mark.parametrize("shape", SHAPES)
def test_mixed_batch_matches_sdpa(shape: tuple[int, int, int]) -> None:
    heads, kv_heads, head_dim = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    query_lens = [1, 1, 1, 300, 57, 1]  # decodes, a fresh prompt, a chunk over a cached prefix
    seq_lens = [1, 700, 1500, 300, 900, 4097]
    sizes = _supported_block_sizes(shape)
    if not sizes:
        pytest.skip(f"varlen attention runs no block size here (torch {torch.__version__})")
    for block_size in sizes:
        tables, start = [], 1
        for s_len in seq_lens:
            count = -(-s_len // block_size)
            tables.append(list(range(start + count - 1, start - 1, -1)))  # reversed blocks
            start += count
        attn = AttentionMetadata.for_contiguous(
            query_lens, seq_lens, tables, block_size, device="cuda"
        )
        dtype = torch.bfloat16
        cache = torch.randn(
            2, start, block_size, kv_heads, head_dim, generator=gen, device="cuda", dtype=dtype
        )  # [2, N, B, K, d]
        tokens = sum(query_lens)
        q = torch.randn(tokens, heads, head_dim, generator=gen, device="cuda", dtype=dtype)
        k = torch.randn(tokens, kv_heads, head_dim, generator=gen, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        scale = head_dim**-0.5
        sdpa = plan_attention(attn, "cuda", backend="sdpa")
        varlen = plan_attention(attn, "cuda", backend="varlen")
        assert varlen.varlen is not None
        want = paged_attention(q, k, v, cache.clone(), attn, scale, plan=sdpa).float()
        got = paged_attention(q, k, v, cache.clone(), attn, scale, plan=varlen).float()
        assert (want - got).abs().max().item() <= 2e-2, block_size


def test_varlen_reads_what_write_kv_wrote() -> None:
    shape = SHAPES[0]
    sizes = _supported_block_sizes(shape)
    if not sizes:
        pytest.skip("no supported block size")
    heads, kv_heads, head_dim = shape
    block_size = sizes[0]
    attn = AttentionMetadata.for_contiguous([1], [3], [[1]], block_size, device="cuda")
    cache = torch.zeros(2, 2, block_size, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.ones(1, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    write_kv(k, k * 3, cache, attn.slot_mapping)
    q = torch.zeros(1, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    out = paged_attention(
        q, k, k * 3, cache, attn, 0.1, plan=plan_attention(attn, "cuda", backend="varlen")
    )
    # uniform weights over keys 0, 1 (zeros) and 2 (threes): mean 1.0
    assert torch.allclose(out.float(), torch.ones_like(out, dtype=torch.float32), atol=1e-2)
