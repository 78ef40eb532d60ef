"""decode_attention: equal to paged_attention on decode batches (GQA and MHA, padded tables,
padding rows), traceable with fullgraph=True; write_decode_kv writes only its slots."""

from __future__ import annotations

import pytest
import torch

from internvl_core.model import decode_attention as decode_module
from internvl_core.model.attention import paged_attention
from internvl_core.model.attention_metadata import AttentionMetadata
from internvl_core.model.cpu_kernels import load_cpu_kernels
from internvl_core.model.decode_attention import decode_attention, write_decode_kv

HEADS, HEAD_DIM = 4, 16
BLOCK_SIZE, NUM_BLOCKS = 4, 40
SCALE = HEAD_DIM**-0.5


@pytest.fixture(params=["kernel", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The C++ kernel (when it builds here) or the pure-torch gather path."""
    if request.param == "kernel" and not load_cpu_kernels():
        pytest.skip("the C++ CPU kernel does not build here")
    if request.param == "torch":
        monkeypatch.setattr(decode_module, "kernels_loaded", lambda: False)
    return request.param


def _filled_cache(kv_heads: int, gen: torch.Generator) -> torch.Tensor:
    """A cache of random values everywhere: stale entries past a sequence must be masked."""
    return torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, kv_heads, HEAD_DIM, generator=gen)


def _tables(seq_lens: list[int], gen: torch.Generator) -> list[list[int]]:
    perm = torch.randperm(NUM_BLOCKS - 1, generator=gen).tolist()  # block NUM_BLOCKS-1: scratch
    tables, used = [], 0
    for s_len in seq_lens:
        count = -(-s_len // BLOCK_SIZE)
        tables.append(perm[used : used + count])
        used += count
    return tables


@pytest.mark.parametrize("kv_heads", [2, HEADS], ids=["gqa", "mha"])
def test_matches_paged_attention(kv_heads: int, path: str) -> None:
    gen = torch.Generator().manual_seed(kv_heads)
    seq_lens = [1, 5, 16, 17, 33, 2]
    tables = _tables(seq_lens, gen)
    cache = _filled_cache(kv_heads, gen)
    q = torch.randn(len(seq_lens), HEADS, HEAD_DIM, generator=gen)  # [B, H, d]
    k = torch.randn(len(seq_lens), kv_heads, HEAD_DIM, generator=gen)  # [B, K, d]
    v = torch.randn(len(seq_lens), kv_heads, HEAD_DIM, generator=gen)  # [B, K, d]
    attn = AttentionMetadata.for_contiguous([1] * len(seq_lens), seq_lens, tables, BLOCK_SIZE)
    reference_cache = cache.clone()
    expected = paged_attention(q, k, v, reference_cache, attn, SCALE)  # [B, H, d]

    # Two padding rows (scratch block, seq len 1) and a table wider than any sequence needs.
    width, scratch = 12, NUM_BLOCKS - 1
    padded = torch.full((len(seq_lens) + 2, width), scratch, dtype=torch.int64)  # [B + 2, W]
    for row, table in enumerate(tables):
        padded[row, : len(table)] = torch.tensor(table)
    slots = torch.cat([attn.slot_mapping, torch.full((2,), scratch * BLOCK_SIZE)])  # [B + 2]
    lens = torch.tensor([*seq_lens, 1, 1])  # [B + 2]
    pad = torch.randn(2, kv_heads, HEAD_DIM, generator=gen)  # [2, K, d]
    write_decode_kv(torch.cat([k, pad]), torch.cat([v, pad]), cache, slots)
    q_padded = torch.cat([q, torch.randn(2, HEADS, HEAD_DIM, generator=gen)])  # [B + 2, H, d]
    out = decode_attention(q_padded, cache, padded, lens, SCALE)  # [B + 2, H, d]

    assert (out[: len(seq_lens)] - expected).abs().max().item() <= 1e-5
    # The padding rows touched only the scratch block.
    torch.testing.assert_close(cache[:, :scratch], reference_cache[:, :scratch], rtol=0, atol=0)


def test_write_decode_kv_touches_only_its_slots() -> None:
    gen = torch.Generator().manual_seed(1)
    cache = _filled_cache(2, gen)
    before = cache.clone()
    k = torch.randn(3, 2, HEAD_DIM, generator=gen)  # [3, K, d]
    v = torch.randn(3, 2, HEAD_DIM, generator=gen)  # [3, K, d]
    slots = torch.tensor([0, 9, 37])  # [3]
    write_decode_kv(k, v, cache, slots)
    flat = cache.view(2, NUM_BLOCKS * BLOCK_SIZE, 2, HEAD_DIM)  # [2, slots, K, d]
    torch.testing.assert_close(flat[0, slots], k, rtol=0, atol=0)
    torch.testing.assert_close(flat[1, slots], v, rtol=0, atol=0)
    flat[:, slots] = before.view_as(flat)[:, slots]
    torch.testing.assert_close(cache, before, rtol=0, atol=0)


def test_traces_with_fullgraph(path: str) -> None:
    """No graph break or host sync: dynamo traces write + attention as one graph."""
    gen = torch.Generator().manual_seed(2)
    cache = _filled_cache(2, gen)
    eager_cache = cache.clone()
    tables = torch.tensor([[3, 7, 0], [5, 0, 0]])  # [2, 3]
    lens = torch.tensor([9, 2])  # [2]
    slots = torch.tensor([7 * BLOCK_SIZE, 5 * BLOCK_SIZE + 1])  # [2]
    q = torch.randn(2, HEADS, HEAD_DIM, generator=gen)  # [2, H, d]
    k = torch.randn(2, 2, HEAD_DIM, generator=gen)  # [2, K, d]

    def step(cache: torch.Tensor) -> torch.Tensor:
        write_decode_kv(k, k, cache, slots)
        return decode_attention(q, cache, tables, lens, SCALE)  # [2, H, d]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(cache), step(eager_cache))
    torch.testing.assert_close(cache, eager_cache)
