"""Traceable decode attention: one query token per sequence over its paged KV cache.

q [B, H, d] + a layer's cache [2, num_blocks, block_size, K, d] + block tables [B, W] + seq lens
[B] -> [B, H, d]. Pure torch with static shapes and no host reads, so `torch.compile(fullgraph=
True)` traces it and a CUDA graph can replay it. On CUDA with Triton the attention itself is the
paged Triton kernel (`triton_decode_attention.py`), which reads K/V in place instead of
gathering every row's whole width bucket; on the CPU in float32 it is the C++ kernel when loaded.
Prefill and eager decode stay on `attention.paged_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from internvl_core.model.cpu_kernels import kernels_loaded
from internvl_core.model.triton_decode_attention import paged_decode_attention, triton_available

_TRITON = triton_available()  # read once: a plain bool for dynamo to trace through


@dataclass(slots=True)
class DecodeMetadata:
    """Per-step index tensors of a decode-only batch padded to a bucket of B rows (on device).

    Padding rows point every index at a scratch block no sequence owns (seq len 1), so their
    writes never touch a real sequence's cache and their outputs are dropped by the caller.
    """

    slot_mapping: torch.Tensor  # [B] int64 cache slot of each row's new token
    block_tables: torch.Tensor  # [B, W] int64 block ids (entries past a sequence's blocks: any)
    seq_lens: torch.Tensor  # [B] int64 tokens in context including the new one
    long_rope_mask: torch.Tensor | None = None  # [B] bool Phi-3 longrope: long factors per row


@torch.library.custom_op("internvl::write_decode_kv", mutates_args=("kv_cache",))
def write_decode_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the new token's k/v [B, K, d] at `slot_mapping` [B] of the cache, in place.

    A custom op that declares its mutation: traced as plain index_copy_ on a view of the cache,
    inductor functionalizes the write into a copy of the whole cache per layer and step.
    """
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    flat = kv_cache.view(2, num_slots, kv_cache.shape[3], kv_cache.shape[4])  # [2, slots, K, d]
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


@write_decode_kv.register_fake
def _write_decode_kv_fake(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    return None


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attend each row's one query over the first `seq_lens[b]` cached tokens of its blocks.

    Args:
        q: [B, H, d] queries (H a multiple of K: grouped-query attention).
        kv_cache: [2, num_blocks, block_size, K, d], already holding this step's k/v.
        block_tables: [B, W] int64; W * block_size >= max(seq_lens).
        seq_lens: [B] int64, at least 1.
        scale: softmax scale (head_dim ** -0.5).

    Returns:
        [B, H, d] attention output in q's dtype.
    """
    if q.is_cuda and _TRITON:
        # In place through the block tables (no gather of the width bucket): Triton on CUDA.
        return paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale)  # [B, H, d]
    if q.device.type == "cpu" and q.dtype == torch.float32 and kernels_loaded():
        return _cpu_kernel_decode(q, kv_cache, block_tables, seq_lens, scale)  # [B, H, d]
    num_rows, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    width = block_tables.shape[1]
    num_keys = width * block_size
    ids = block_tables.reshape(-1)  # [B * W]
    keys = kv_cache[0].index_select(0, ids)  # [B * W, block_size, K, d]
    values = kv_cache[1].index_select(0, ids)  # [B * W, block_size, K, d]
    keys = keys.view(num_rows, num_keys, num_kv_heads, head_dim)  # [B, S, K, d]
    values = values.view(num_rows, num_keys, num_kv_heads, head_dim)  # [B, S, K, d]
    query = q.view(num_rows, num_kv_heads, group, head_dim)  # [B, K, G, d]
    scores = torch.matmul(query, keys.permute(0, 2, 3, 1)) * scale  # [B, K, G, S]
    key_pos = torch.arange(num_keys, device=q.device)  # [S]
    valid = key_pos[None, :] < seq_lens[:, None]  # [B, S]
    scores = scores.float().masked_fill(~valid[:, None, None, :], float("-inf"))  # [B, K, G, S]
    probs = torch.softmax(scores, dim=-1).to(values.dtype)  # [B, K, G, S]
    out = torch.matmul(probs, values.transpose(1, 2))  # [B, K, G, d]
    return out.reshape(num_rows, num_heads, head_dim).to(q.dtype)  # [B, H, d]


def _cpu_kernel_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The C++ CPU kernel (`internvl_cpu::paged_attention`), one query row per sequence."""
    num_rows = q.shape[0]
    rows = torch.arange(num_rows, dtype=torch.int64, device=q.device)  # [B] query_start
    ones = torch.ones(num_rows, dtype=torch.int64, device=q.device)  # [B] query_lens
    out = torch.empty_like(q)  # [B, H, d]
    torch.ops.internvl_cpu.paged_attention(
        q.contiguous(), kv_cache, block_tables, rows, ones, seq_lens.contiguous(), scale, out
    )
    return out
