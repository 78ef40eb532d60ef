"""KV block sizes, the explicit / CPU block budget, and the per-stage block pools.

In: EngineConfig (explicit `num_kv_blocks`, `kv_cache_memory_bytes`, or the CPU default) and a
stage's bytes per block. Out: a block count. On CUDA without an explicit budget the count comes
from a measured peak instead (memory_plan.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from internvl_core.config import EngineConfig, LLMArchitecture
from internvl_core.errors import InternVLError

logger = logging.getLogger(__name__)

# Budget on CPU when the config names none: KV on CPU is for tests and small demos.
DEFAULT_CPU_KV_BYTES = 256 << 20


def kv_block_bytes(
    arch: LLMArchitecture, num_layers: int, block_size: int, dtype: torch.dtype
) -> int:
    """Bytes one block id costs on a stage owning `num_layers` layers (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * block_size * arch.num_key_value_heads * arch.head_dim * elem
    return per_layer * num_layers


def has_explicit_budget(config: EngineConfig) -> bool:
    """The config fixes the pool (block count or bytes): nothing to measure."""
    return config.num_kv_blocks is not None or config.kv_cache_memory_bytes is not None


def plan_num_blocks(config: EngineConfig, *, block_bytes: int, device: torch.device) -> int:
    """Blocks this stage can hold, from the first of: num_kv_blocks, kv_cache_memory_bytes, or
    (CPU) a 256 MiB default capped to what the scheduler could ever use. A CUDA stage without
    an explicit budget is planned from a measured peak (memory_plan.measure_kv_plan)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_memory_bytes is not None:
        budget, source = config.kv_cache_memory_bytes, "kv_cache_memory_bytes"
    else:
        assert device.type != "cuda", "CUDA stages plan from a measured peak"
        useful = config.max_num_seqs * math.ceil(config.max_model_len / config.block_size)
        budget = min(DEFAULT_CPU_KV_BYTES, useful * block_bytes)
        source = "the CPU default budget"
    num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise InternVLError(
            f"KV budget from {source} is {budget} bytes; one KV block needs {block_bytes} bytes "
            f"(block_size {config.block_size})"
        )
    logger.info("KV pool: %d blocks of %d bytes from %s", num_blocks, block_bytes, source)
    return num_blocks


@dataclass(slots=True)
class KVCache:
    """One stage's block pool: `tensors[i]` is owned layer i's [2, num_blocks, block_size, K, d]."""

    tensors: list[torch.Tensor]
    num_blocks: int
    block_size: int

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)
