"""KV pool size from a measured peak: one profiling step at the engine's limits, then the KV pool
gets what `gpu_memory_utilization` leaves (follows vLLM's profile_run / determine_available_memory).

In: a ModelRunner (weights loaded, no KV pool yet), the EngineConfig and a MemoryReader (CUDA, or
a fake one in tests). Out: a KVMemoryPlan (weights, activation peak, KV bytes and blocks).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from internvl_core.config import EngineConfig, SamplingParams
from internvl_core.engine.batch import SamplingRequest, ScheduledBatch
from internvl_core.errors import InternVLError

if TYPE_CHECKING:
    from internvl_core.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Every sampler feature on, so the profile sees its largest temporaries.
PROFILE_SAMPLING = SamplingParams(
    temperature=1.0,
    top_p=0.9,
    top_k=50,
    min_p=0.05,
    repetition_penalty=1.1,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    logprobs=True,
    top_logprobs=20,
)
PROFILE_REQUEST_ID = "kv-memory-profile"


class MemoryReader(Protocol):
    """What the planner reads from a device allocator (torch.cuda's functions on CUDA)."""

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the whole device, every process included."""
        ...

    def memory_allocated(self) -> int:
        """Bytes held by this process's live tensors."""
        ...

    def max_memory_allocated(self) -> int:
        """Peak of `memory_allocated` since the last `reset_peak`."""
        ...

    def reset_peak(self) -> None: ...

    def settle(self) -> None:
        """Wait for queued work and hand cached, unused blocks back to the device."""
        ...


class CudaMemoryReader:
    """MemoryReader over torch.cuda for one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.device)

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def settle(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    """What one profiling step measured on a device."""

    total_bytes: int  # device capacity
    used_bytes: int  # in use after the step, caches emptied: weights, CUDA context, other procs
    weights_bytes: int  # this process's tensors before the step (weights, rope tables)
    activation_peak_bytes: int  # peak allocated during the step above `weights_bytes`
    # CUDA graphs: peak of a decode step at max_num_seqs, held apart by the graphs' memory pool
    graph_bytes: int = 0


@dataclass(frozen=True, slots=True)
class KVMemoryPlan:
    """How a stage's share of device memory splits; `num_blocks` goes to the KV pool."""

    total_bytes: int
    budget_bytes: int  # total * gpu_memory_utilization
    weights_bytes: int
    activation_peak_bytes: int
    other_bytes: int  # used but not this process's tensors: CUDA context, NCCL, other processes
    graph_bytes: int  # the CUDA graphs' private pool (0 without graphs)
    kv_bytes: int
    block_bytes: int
    block_size: int
    num_blocks: int

    @property
    def max_concurrent_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def summary(self) -> str:
        gib = 1 << 30
        return (
            f"KV plan: budget {self.budget_bytes / gib:.2f} of {self.total_bytes / gib:.2f} GiB; "
            f"weights {self.weights_bytes / gib:.2f} GiB, activation peak "
            f"{self.activation_peak_bytes / gib:.2f} GiB, other {self.other_bytes / gib:.2f} GiB, "
            f"CUDA graphs {self.graph_bytes / gib:.2f} GiB; "
            f"KV {self.kv_bytes / gib:.2f} GiB = {self.num_blocks} blocks of {self.block_bytes} "
            f"bytes, {self.max_concurrent_tokens} tokens at once"
        )


def plan_kv_memory(
    profile: MemoryProfile,
    *,
    gpu_memory_utilization: float,
    block_bytes: int,
    block_size: int,
) -> KVMemoryPlan:
    """KV bytes = total * utilization - used after profiling - activation peak - graph pool.

    `used` counts everything on the device (this process's weights, its CUDA context, other
    processes), so a shared GPU shrinks the pool instead of running out of memory later.
    """
    budget = int(profile.total_bytes * gpu_memory_utilization)
    kv_bytes = budget - profile.used_bytes - profile.activation_peak_bytes - profile.graph_bytes
    if kv_bytes < block_bytes:
        raise InternVLError(
            f"gpu_memory_utilization {gpu_memory_utilization} of {profile.total_bytes} bytes "
            f"leaves {kv_bytes} bytes for the KV cache after {profile.used_bytes} bytes in use, "
            f"an activation peak of {profile.activation_peak_bytes} bytes and "
            f"{profile.graph_bytes} bytes of CUDA graphs; one KV block needs {block_bytes} "
            f"bytes (block_size {block_size})"
        )
    return KVMemoryPlan(
        total_bytes=profile.total_bytes,
        budget_bytes=budget,
        weights_bytes=profile.weights_bytes,
        activation_peak_bytes=profile.activation_peak_bytes,
        other_bytes=max(0, profile.used_bytes - profile.weights_bytes),
        graph_bytes=profile.graph_bytes,
        kv_bytes=kv_bytes,
        block_bytes=block_bytes,
        block_size=block_size,
        num_blocks=kv_bytes // block_bytes,
    )


def profile_batch(config: EngineConfig) -> ScheduledBatch:
    """The step that needs the most activation memory under `config`.

    `max_num_batched_tokens` new tokens over `min(max_num_seqs, tokens)` sequences, each sampling
    one token. Sequence 0 takes the largest chunk, placed at the end of a `max_model_len` context
    (the widest attention); the others share the remaining tokens. Block ids are contiguous.
    """
    block_size = config.block_size
    num_tokens = config.max_num_batched_tokens
    num_seqs = min(config.max_num_seqs, num_tokens)
    first = min(config.max_model_len, num_tokens - (num_seqs - 1))
    base, extra = divmod(num_tokens - first, max(1, num_seqs - 1))
    query_lens = [first] + [base + (1 if i < extra else 0) for i in range(num_seqs - 1)]
    context_lens = [config.max_model_len - first] + [0] * (num_seqs - 1)
    block_tables: list[list[int]] = []
    next_block = 0
    for query_len, context_len in zip(query_lens, context_lens, strict=True):
        num_blocks = math.ceil((query_len + context_len) / block_size)
        block_tables.append(list(range(next_block, next_block + num_blocks)))
        next_block += num_blocks
    history = list(range(16))  # token ids the penalties look at
    return ScheduledBatch(
        batch_id=-1,
        request_ids=[PROFILE_REQUEST_ID] * num_seqs,
        input_token_ids=[0] * sum(query_lens),
        query_lens=query_lens,
        context_lens=context_lens,
        prompt_lens=[q + c for q, c in zip(query_lens, context_lens, strict=True)],
        block_tables=block_tables,
        sample_flags=[True] * num_seqs,
        sampling=[SamplingRequest(PROFILE_REQUEST_ID, PROFILE_SAMPLING, history, history, ())]
        * num_seqs,
        block_size=block_size,
    )


def decode_profile_batch(config: EngineConfig) -> ScheduledBatch:
    """A decode step of `max_num_seqs` sequences (one block each): the largest CUDA graph."""
    num_seqs = config.max_num_seqs
    tables = [[i] for i in range(num_seqs)]
    return ScheduledBatch.greedy_decode(
        -2, [1] * num_seqs, tables, config.block_size, request_prefix=PROFILE_REQUEST_ID
    )


def profile_memory(
    runner: ModelRunner, config: EngineConfig, reader: MemoryReader
) -> MemoryProfile:
    """Run `profile_batch` once through this stage (zeros as a later stage's input) on a scratch
    KV pool just big enough for it, and read the allocator around it. With CUDA graphs, the peak
    of an eager decode step at `max_num_seqs` too: the graphs keep that much in their own pool
    (one pool shared by every bucket, the largest bucket its high-water mark)."""
    assert runner.kv_cache is None, "profile before the KV pool exists"
    batch = profile_batch(config)
    num_blocks = max(sum(len(table) for table in batch.block_tables), config.max_num_seqs)
    reader.settle()
    weights = reader.memory_allocated()
    runner.init_kv_cache(num_blocks, warm_up=False)  # scratch pool: not in the activation peak
    reader.settle()
    activation = _step_peak(runner, batch, reader)
    graphs = runner.compiled_decode is not None and runner.compiled_decode.use_cuda_graphs
    graph_bytes = _step_peak(runner, decode_profile_batch(config), reader) if graphs else 0
    runner.kv_cache = None
    reader.settle()
    free, total = reader.mem_get_info()
    return MemoryProfile(
        total_bytes=total,
        used_bytes=total - free,
        weights_bytes=weights,
        activation_peak_bytes=activation,
        graph_bytes=graph_bytes,
    )


def _step_peak(runner: ModelRunner, batch: ScheduledBatch, reader: MemoryReader) -> int:
    """Peak bytes allocated by one eager step of `batch` above what was allocated before it."""
    model = runner.model
    before = reader.memory_allocated()
    reader.reset_peak()
    hidden = None
    if not model.is_first_stage:  # what the previous stage would send
        hidden = torch.zeros(
            (batch.num_tokens, model.arch.hidden_size), dtype=model.dtype, device=runner.device
        )  # [T, D]
    compiled, runner.compiled_decode = runner.compiled_decode, None  # eager: no capture here
    try:
        output = runner.execute(batch, hidden)
    finally:
        runner.compiled_decode = compiled
    reader.settle()
    peak = reader.max_memory_allocated()
    del output, hidden
    reader.settle()
    return max(0, peak - before)


def measure_kv_plan(
    runner: ModelRunner, config: EngineConfig, reader: MemoryReader
) -> KVMemoryPlan:
    """Profile this stage, plan its KV pool and log the plan."""
    profile = profile_memory(runner, config, reader)
    plan = plan_kv_memory(
        profile,
        gpu_memory_utilization=config.gpu_memory_utilization,
        block_bytes=runner.kv_block_bytes(),
        block_size=config.block_size,
    )
    logger.info("%s", plan.summary())
    return plan
