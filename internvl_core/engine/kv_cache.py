"""KV memory planning and the per-stage block pools (one tensor per owned decoder layer).

In: EngineConfig (explicit `num_kv_blocks`, `kv_cache_memory_bytes`, or a fraction of GPU memory)
and a stage's bytes per block. Out: a block count, and the zeroed cache tensors of that size.
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


def activation_reserve_bytes(
    arch: LLMArchitecture, config: EngineConfig, dtype: torch.dtype
) -> int:
    """Rough peak of one forward's activations, kept out of the GPU KV budget.

    Per batched token: the fused qkv and gate_up outputs, a few [D] temporaries; plus float32
    logits of up to `max_num_seqs` sampled rows (and the sampler's copies of them).
    """
    elem = torch.empty((), dtype=dtype).element_size()
    qkv = (arch.num_attention_heads + 2 * arch.num_key_value_heads) * arch.head_dim
    per_token = (qkv + 3 * arch.intermediate_size + 6 * arch.hidden_size) * elem
    logits = config.max_num_seqs * arch.vocab_size * 4 * 4
    return 2 * config.max_num_batched_tokens * per_token + logits


def plan_num_blocks(
    config: EngineConfig,
    *,
    block_bytes: int,
    device: torch.device,
    reserve_bytes: int = 0,
) -> int:
    """Blocks this stage can hold, from the first of: num_kv_blocks, kv_cache_memory_bytes,
    GPU memory (`gpu_memory_utilization` of the device minus what is already used minus the
    activation reserve), or a 256 MiB CPU default capped to what the scheduler could ever use."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_memory_bytes is not None:
        budget, source = config.kv_cache_memory_bytes, "kv_cache_memory_bytes"
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * config.gpu_memory_utilization) - used - reserve_bytes
        source = f"gpu_memory_utilization {config.gpu_memory_utilization} of {total} bytes"
    else:
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
