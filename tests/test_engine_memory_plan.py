"""KV memory from a measured peak: the plan arithmetic, the profiling batch, and the profiling
step through real stages on CPU with a fake memory reader (the CUDA reader in a gpu test)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from internvl_core.config import EngineConfig, ModelArchitecture
from internvl_core.engine.memory_plan import (
    CudaMemoryReader,
    MemoryProfile,
    measure_kv_plan,
    plan_kv_memory,
    profile_batch,
)
from internvl_core.engine.model_runner import ModelRunner
from internvl_core.errors import InternVLError
from internvl_core.model.decoder import DecoderModel

GIB = 1 << 30
MIB = 1 << 20


class FakeReader:
    """A device of `total` bytes: allocations are scripted, calls are recorded."""

    def __init__(self, *, total: int, used: int, allocated: int, peak: int) -> None:
        self.total, self.used, self.allocated, self.peak = total, used, allocated, peak
        self.calls: list[str] = []

    def mem_get_info(self) -> tuple[int, int]:
        self.calls.append("mem_get_info")
        return self.total - self.used, self.total

    def memory_allocated(self) -> int:
        self.calls.append("memory_allocated")
        return self.allocated

    def max_memory_allocated(self) -> int:
        self.calls.append("max_memory_allocated")
        return self.peak

    def reset_peak(self) -> None:
        self.calls.append("reset_peak")

    def settle(self) -> None:
        self.calls.append("settle")


def test_plan_gives_kv_what_utilization_leaves() -> None:
    profile = MemoryProfile(
        total_bytes=80 * GIB,
        used_bytes=17 * GIB,
        weights_bytes=15 * GIB,
        activation_peak_bytes=3 * GIB,
    )
    plan = plan_kv_memory(profile, gpu_memory_utilization=0.9, block_bytes=2 * MIB, block_size=16)
    assert plan.budget_bytes == int(80 * GIB * 0.9)
    assert plan.kv_bytes == int(80 * GIB * 0.9) - 17 * GIB - 3 * GIB
    assert plan.num_blocks == plan.kv_bytes // (2 * MIB)
    assert plan.other_bytes == 2 * GIB  # CUDA context, other processes
    assert plan.max_concurrent_tokens == plan.num_blocks * 16
    text = plan.summary()
    assert "weights 15.00 GiB" in text and "activation peak 3.00 GiB" in text
    assert f"{plan.num_blocks} blocks" in text and f"{plan.max_concurrent_tokens} tokens" in text


def test_plan_refuses_when_nothing_is_left() -> None:
    profile = MemoryProfile(
        total_bytes=24 * GIB, used_bytes=21 * GIB, weights_bytes=20 * GIB, activation_peak_bytes=GIB
    )
    with pytest.raises(InternVLError, match=r"gpu_memory_utilization 0\.9 of .* one KV block"):
        plan_kv_memory(profile, gpu_memory_utilization=0.9, block_bytes=MIB, block_size=16)


@pytest.mark.parametrize(
    ("tokens", "seqs", "model_len"),
    [(64, 8, 256), (2048, 64, 8192), (5, 8, 64), (100, 3, 40), (16, 1, 16)],
)
def test_profile_batch_fills_the_step_limits(tokens: int, seqs: int, model_len: int) -> None:
    config = EngineConfig(
        max_num_batched_tokens=tokens, max_num_seqs=seqs, max_model_len=model_len, block_size=16
    )
    batch = profile_batch(config)
    num_seqs = min(seqs, tokens)
    assert batch.num_seqs == num_seqs and len(batch.sampling) == num_seqs
    assert all(batch.sample_flags)
    assert batch.query_lens[0] == max(batch.query_lens)
    assert batch.context_lens[0] + batch.query_lens[0] == model_len  # the widest attention
    if batch.query_lens[0] < model_len:
        assert batch.num_tokens == tokens
    ids = [b for table in batch.block_tables for b in table]
    assert ids == list(range(len(ids))), "disjoint contiguous block ids"
    for table, q, c in zip(batch.block_tables, batch.query_lens, batch.context_lens, strict=True):
        assert len(table) * 16 >= q + c > (len(table) - 1) * 16


@pytest.fixture(scope="module")
def path(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("qwen2", num_llm_layers=3)


def _runner(path: Path, lo: int, hi: int) -> ModelRunner:
    arch = ModelArchitecture.from_checkpoint(path).llm
    model = DecoderModel.from_checkpoint(path, start_layer=lo, end_layer=hi, arch=arch)
    return ModelRunner(model, block_size=16)


@pytest.mark.parametrize("ranges", [[(0, 3)], [(0, 1), (1, 2), (2, 3)]])
def test_every_stage_profiles_through_its_runner(path: Path, ranges: list[tuple[int, int]]) -> None:
    """First, middle and last stages run the profiling step (CPU); the fake device answers."""
    config = EngineConfig(
        max_num_batched_tokens=48, max_num_seqs=4, max_model_len=96, gpu_memory_utilization=0.5
    )
    for lo, hi in ranges:
        runner = _runner(path, lo, hi)
        reader = FakeReader(total=GIB, used=100 * MIB, allocated=60 * MIB, peak=90 * MIB)
        plan = measure_kv_plan(runner, config, reader)
        assert plan.activation_peak_bytes == 30 * MIB
        assert plan.num_blocks == (GIB // 2 - 100 * MIB - 30 * MIB) // runner.kv_block_bytes()
        assert runner.kv_cache is None, "the scratch pool is gone"
        calls = reader.calls
        assert calls.index("reset_peak") < calls.index("max_memory_allocated")
        assert calls[-2:] == ["settle", "mem_get_info"], "used is read after the scratch is freed"


def test_cuda_graphs_reserve_a_decode_step_at_max_num_seqs(path: Path) -> None:
    """With CUDA graphs the plan holds back one more measured peak (an eager decode step of
    max_num_seqs rows) for the graphs' private pool."""
    config = EngineConfig(
        max_num_batched_tokens=48, max_num_seqs=4, max_model_len=96, gpu_memory_utilization=0.5
    )
    runner = _runner(path, 0, 3)
    plain = measure_kv_plan(runner, config, FakeReader(total=GIB, used=0, allocated=0, peak=0))
    assert plain.graph_bytes == 0
    runner.compiled_decode = SimpleNamespace(use_cuda_graphs=True, bind=lambda *a, **k: None)
    reader = FakeReader(total=GIB, used=100 * MIB, allocated=60 * MIB, peak=90 * MIB)
    plan = measure_kv_plan(runner, config, reader)
    assert plan.graph_bytes == 30 * MIB and plan.activation_peak_bytes == 30 * MIB
    assert plan.num_blocks == (GIB // 2 - 100 * MIB - 60 * MIB) // runner.kv_block_bytes()
    assert reader.calls.count("reset_peak") == 2, "the prefill step, then the decode step"
    assert "CUDA graphs 0.03 GiB" in plan.summary()
    assert runner.compiled_decode is not None, "restored after the eager profile steps"


def test_plan_kv_blocks_uses_the_reader_unless_the_config_fixes_the_pool(path: Path) -> None:
    runner = _runner(path, 0, 3)
    reader = FakeReader(total=GIB, used=0, allocated=0, peak=0)
    config = EngineConfig(max_num_batched_tokens=32, max_num_seqs=2, max_model_len=64)
    measured = runner.plan_kv_blocks(config, reader=reader)
    assert measured == int(GIB * 0.9) // runner.kv_block_bytes()
    fixed = EngineConfig(num_kv_blocks=7)
    assert (
        runner.plan_kv_blocks(fixed, reader=FakeReader(total=1, used=1, allocated=0, peak=0)) == 7
    )
    assert runner.plan_kv_blocks(config) > 0, "CPU without a reader: the CPU default budget"


@pytest.mark.gpu
def test_cuda_plan_is_measured_and_the_pool_fits(path: Path) -> None:
    arch = ModelArchitecture.from_checkpoint(path).llm
    model = DecoderModel.from_checkpoint(
        path, arch=arch, dtype=torch.bfloat16, device=torch.device("cuda")
    )
    runner = ModelRunner(model, block_size=16)
    config = EngineConfig(
        max_num_batched_tokens=512, max_num_seqs=16, max_model_len=1024, gpu_memory_utilization=0.3
    )
    reader = CudaMemoryReader(runner.device)
    plan = measure_kv_plan(runner, config, reader)
    assert plan.activation_peak_bytes > 0 and plan.num_blocks > 0
    assert plan.weights_bytes >= sum(p.numel() * p.element_size() for p in model.parameters())
    runner.init_kv_cache(plan.num_blocks)
    free, total = torch.cuda.mem_get_info()
    assert total - free <= plan.budget_bytes, "the pool stays inside the utilization budget"
