"""CUDA paged attention: one FlashAttention varlen call per layer for the whole mixed batch.

`torch.nn.attention.varlen.varlen_attn` reads keys and values in place from the block pool through
`block_table` (the pool [num_blocks, block_size, K, d] is exactly one half of a layer's cache
[2, num_blocks, block_size, K, d]), with `seqused_k` the context length of each sequence and a
causal window (-1, 0), bottom-right aligned: query row i of a sequence with Q new tokens and S
keys sees keys 0..S-Q+i, which is the engine's rule. GQA natively (`enable_gqa`), fp16/bf16 only.

FlashAttention accepts only some page sizes (FA2 wants multiples of 256; builds differ), so
`varlen_supported` tries one small call per (device, dtype, block size, head_dim) and caches the
answer; callers fall back to SDPA when it says no. `benchmarks/gpu_check.py` reports which block
sizes work on the machine at hand.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import numpy as np
import torch

from internvl_core.model.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)

_SUPPORTED: dict[tuple[str, torch.dtype, int, int, int, int], bool] = {}


@dataclass(slots=True)
class VarlenPlan:
    """Per-forward index tensors on the device, shared by every layer."""

    cu_seq_q: torch.Tensor  # [S + 1] int32 query row offsets
    cu_seq_k: torch.Tensor  # [S + 1] int32 key offsets (cumulative context lengths)
    seq_lens: torch.Tensor  # [S] int32 keys per sequence (seqused_k)
    block_tables: torch.Tensor  # [S, max_num_blocks] int32
    max_q: int
    max_k: int


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_has_paging() -> bool:
    """Whether this torch's varlen_attn takes a paged cache (`block_table`, `seqused_k`; torch
    2.13). torch 2.11's takes neither, nor `enable_gqa`."""
    varlen_attn = _varlen_attn()
    if varlen_attn is None:
        return False
    params = inspect.signature(varlen_attn).parameters
    return all(name in params for name in ("block_table", "seqused_k", "enable_gqa"))


def plan_varlen(attn: AttentionMetadata, device: torch.device | str) -> VarlenPlan:
    query_lens = np.asarray(attn.query_lens, dtype=np.int32)  # [S]
    seq_lens = np.asarray(attn.seq_lens, dtype=np.int32)  # [S]
    cu_q = np.concatenate(([0], np.cumsum(query_lens))).astype(np.int32)  # [S + 1]
    cu_k = np.concatenate(([0], np.cumsum(seq_lens))).astype(np.int32)  # [S + 1]
    tables = attn.host_block_tables
    if tables is None:
        tables = attn.block_tables.cpu().numpy()  # [S, max_num_blocks]
    host = [cu_q, cu_k, seq_lens, np.ascontiguousarray(tables, dtype=np.int32)]
    cu_q_t, cu_k_t, seq_t, tables_t = (torch.from_numpy(a).to(device) for a in host)
    return VarlenPlan(cu_q_t, cu_k_t, seq_t, tables_t, int(query_lens.max()), int(seq_lens.max()))


def varlen_paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, plan: VarlenPlan, scale: float
) -> torch.Tensor:
    """q [T, H, d] over a cache [2, num_blocks, block_size, K, d] already holding this step's
    K/V -> [T, H, d]."""
    varlen_attn = _varlen_attn()
    assert varlen_attn is not None, "torch.nn.attention.varlen is missing"
    return varlen_attn(
        q,
        kv_cache[0],  # [num_blocks, block_size, K, d]
        kv_cache[1],
        plan.cu_seq_q,
        plan.cu_seq_k,
        plan.max_q,
        plan.max_k,
        scale=scale,
        window_size=(-1, 0),  # causal, bottom-right aligned
        enable_gqa=q.shape[1] != kv_cache.shape[3],
        seqused_k=plan.seq_lens,
        block_table=plan.block_tables,
    )  # [T, H, d]


def varlen_supported(
    device: torch.device | str,
    dtype: torch.dtype,
    block_size: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> bool:
    """Whether the varlen kernel runs this configuration here (one probe call, cached)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    key = (str(device), dtype, block_size, heads, kv_heads, head_dim)
    if key not in _SUPPORTED:
        _SUPPORTED[key] = _probe(device, dtype, block_size, heads, kv_heads, head_dim)
    return _SUPPORTED[key]


def _probe(
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> bool:
    if not varlen_has_paging():
        logger.warning(
            "torch %s has no paged varlen_attn (block_table needs torch 2.13): %s attention "
            "takes the Triton/SDPA path",
            torch.__version__,
            device,
        )
        return False
    try:
        cache = torch.zeros(2, 2, block_size, kv_heads, head_dim, dtype=dtype, device=device)
        q = torch.zeros(2, heads, head_dim, dtype=dtype, device=device)  # two one-token rows
        attn = AttentionMetadata.for_contiguous([1, 1], [1, 2], [[0], [1]], block_size)
        varlen_paged_attention(q, cache, plan_varlen(attn, device), head_dim**-0.5)
        torch.cuda.synchronize(device)
        return True
    except Exception as exc:  # an unsupported page size or head_dim: keep the SDPA path
        logger.warning(
            "varlen attention refuses block_size %d, head_dim %d, %s on %s (%s): SDPA path",
            block_size,
            head_dim,
            dtype,
            device,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return False
