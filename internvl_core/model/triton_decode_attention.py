"""Paged decode attention in Triton (CUDA): one query row per sequence, K/V read in place.

q [B, H, d] + a layer's cache [2, num_blocks, block_size, K, d] + block tables [B, W] + seq lens
[B] -> [B, H, d], with no gathered copies: each program of the first kernel takes one (sequence,
KV head, key partition), loads its G = H / K query heads once and streams the partition's keys
through the block table in tiles of BLOCK_N, with an online softmax in fp32; the second kernel
merges the partitions (flash-decoding). Partitions are sized from the shapes alone (batch,
table width), so a CUDA graph captured for one decode bucket replays the same launch.

Registered as the op `internvl::paged_decode_attention` (opaque to torch.compile, capturable in a
CUDA graph). It serves the compiled decode (`decode_attention.py`) and the eager decode rows of
the "triton" backend (`attention.py`), which CUDA takes when FlashAttention's paged varlen is
missing (torch < 2.13). The kernels are defined on first use, so `TRITON_INTERPRET=1` set before
that runs them on CPU tensors (the CPU test); without Triton, `triton_available()` is False.
"""

from __future__ import annotations

import functools
import importlib.util
from types import SimpleNamespace

import torch

# Keys per program tile; at least this many keys per partition before splitting further.
BLOCK_N = 64
MIN_PART_KEYS = 128


@functools.cache
def triton_available() -> bool:
    """Whether Triton is importable here (CUDA builds of torch ship it; CPU builds do not)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 8  # interpreter runs: a few partitions, enough to exercise the merge
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_partitions(num_seqs: int, num_kv_heads: int, max_keys: int, num_sms: int) -> int:
    """Split each sequence's keys so that about two programs per SM run, but never into
    partitions of fewer than MIN_PART_KEYS keys."""
    by_keys = max(1, -(-max_keys // MIN_PART_KEYS))
    by_sms = max(1, -(-2 * num_sms // (num_seqs * num_kv_heads)))
    return min(by_keys, by_sms)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _kernels() -> SimpleNamespace:
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(
        q_ptr,  # [B, H, d]
        k_ptr,  # [num_blocks, block_size, K, d] (the cache's key half)
        v_ptr,  # same layout and strides, the value half
        tables_ptr,  # [B, W] int
        seq_lens_ptr,  # [B] int
        part_acc_ptr,  # [B, H, P, D_PAD] fp32 unnormalised output per partition
        part_m_ptr,  # [B, H, P] fp32 running max
        part_l_ptr,  # [B, H, P] fp32 softmax denominator
        scale,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_tb,
        num_heads,
        num_parts,
        keys_per_part,
        HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        part = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
        start = part * keys_per_part
        end = tl.minimum(start + keys_per_part, seq_len)
        g = tl.arange(0, GROUP_PAD)
        dd = tl.arange(0, D_PAD)
        n = tl.arange(0, TILE)
        heads = kv_head * GROUP + g  # [G_PAD]
        head_ok = g < GROUP
        dim_ok = dd < HEAD_DIM
        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dd[None, :],
            mask=head_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )  # [G_PAD, D_PAD]
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        for tile_start in range(start, end, TILE):
            pos = tile_start + n  # [TILE] key positions
            valid = pos < end
            block = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
            row = block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt
            offsets = row[:, None] + kv_head * stride_kh + dd[None, :]  # [TILE, D_PAD]
            kv_mask = valid[:, None] & dim_ok[None, :]
            keys = tl.load(k_ptr + offsets, mask=kv_mask, other=0.0)  # [TILE, D_PAD]
            scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale  # [G_PAD, TILE]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))  # finite: every tile has a valid key
            alpha = tl.exp(m - m_new)
            probs = tl.exp(scores - m_new[:, None])  # [G_PAD, TILE]
            denom = denom * alpha + tl.sum(probs, 1)
            values = tl.load(v_ptr + offsets, mask=kv_mask, other=0.0)  # [TILE, D_PAD]
            acc = acc * alpha[:, None] + tl.dot(
                probs.to(values.dtype), values, input_precision=PRECISION
            )
            m = m_new
        slot = (seq * num_heads + heads) * num_parts + part  # [G_PAD]
        tl.store(part_m_ptr + slot, m, mask=head_ok)
        tl.store(part_l_ptr + slot, denom, mask=head_ok)
        tl.store(part_acc_ptr + slot[:, None] * D_PAD + dd[None, :], acc, mask=head_ok[:, None])

    @triton.jit
    def merge_kernel(
        part_acc_ptr,
        part_m_ptr,
        part_l_ptr,
        out_ptr,  # [B, H, d]
        stride_ob,
        stride_oh,
        num_heads,
        num_parts,
        HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr,
        PARTS_PAD: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        p = tl.arange(0, PARTS_PAD)
        dd = tl.arange(0, D_PAD)
        part_ok = p < num_parts
        slot = (seq * num_heads + head) * num_parts + p  # [PARTS_PAD]
        m = tl.load(part_m_ptr + slot, mask=part_ok, other=float("-inf"))
        denom = tl.load(part_l_ptr + slot, mask=part_ok, other=0.0)
        top = tl.max(m, 0)  # finite: partition 0 always holds a key
        weight = tl.exp(m - top)  # [PARTS_PAD]; empty partitions (m = -inf) weigh 0
        acc = tl.load(
            part_acc_ptr + slot[:, None] * D_PAD + dd[None, :], mask=part_ok[:, None], other=0.0
        )  # [PARTS_PAD, D_PAD]
        out = tl.sum(acc * weight[:, None], 0) / tl.sum(denom * weight, 0)  # [D_PAD]
        tl.store(
            out_ptr + seq * stride_ob + head * stride_oh + dd,
            out.to(out_ptr.dtype.element_ty),
            mask=dd < HEAD_DIM,
        )

    return SimpleNamespace(partial=partial_kernel, merge=merge_kernel)


def launch_paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The kernels straight from Python (eager callers skip the custom op's dispatch cost;
    traced code calls `paged_decode_attention`, the op): `decode_attention`'s contract."""
    kernels = _kernels()
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_dim = kv_cache.shape
    assert cache_dim == head_dim and num_heads % num_kv_heads == 0, "q and cache heads disagree"
    assert kv_cache.stride(-1) == 1 and q.stride(-1) == 1, "head_dim must be contiguous"
    group = num_heads // num_kv_heads
    out = q.new_empty(q.shape)  # [B, H, d]
    if num_seqs == 0:
        return out
    max_keys = block_tables.shape[1] * block_size
    parts = num_partitions(num_seqs, num_kv_heads, max_keys, _num_sms(q.device.index or 0))
    tile = BLOCK_N
    keys_per_part = -(-max_keys // parts)
    keys_per_part = -(-keys_per_part // tile) * tile  # whole tiles
    d_pad = max(16, _next_pow2(head_dim))
    part_acc = q.new_empty((num_seqs, num_heads, parts, d_pad), dtype=torch.float32)
    part_m = q.new_empty((num_seqs, num_heads, parts), dtype=torch.float32)
    part_l = q.new_empty((num_seqs, num_heads, parts), dtype=torch.float32)
    keys, values = kv_cache[0], kv_cache[1]  # [num_blocks, block_size, K, d] each
    kernels.partial[(num_seqs, num_kv_heads, parts)](
        q,
        keys,
        values,
        block_tables,
        seq_lens,
        part_acc,
        part_m,
        part_l,
        scale,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        block_tables.stride(0),
        num_heads,
        parts,
        keys_per_part,
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        GROUP=group,
        GROUP_PAD=max(16, _next_pow2(group)),
        BLOCK_SIZE=block_size,
        TILE=tile,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    kernels.merge[(num_seqs, num_heads)](
        part_acc,
        part_m,
        part_l,
        out,
        out.stride(0),
        out.stride(1),
        num_heads,
        parts,
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        PARTS_PAD=max(2, _next_pow2(parts)),
    )
    return out


@torch.library.custom_op("internvl::paged_decode_attention", mutates_args=())
def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`decode_attention.decode_attention`'s contract (q [B, H, d] over each row's first
    `seq_lens[b]` cached tokens -> [B, H, d]) as an op that torch.compile and CUDA graphs keep."""
    return launch_paged_decode(q, kv_cache, block_tables, seq_lens, scale)


@paged_decode_attention.register_fake
def _paged_decode_attention_fake(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return q.new_empty(q.shape)
