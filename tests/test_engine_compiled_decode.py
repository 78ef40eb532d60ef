"""Compiled decode: buckets, fullgraph tracing for every family, greedy tokens identical to eager
through the real LLMEngine (padding rows, run-ahead placeholders, PP=2, Phi-3 long rope), and
the CUDA-graph path (gpu)."""

from __future__ import annotations

import gc
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams
from internvl_core.engine.compiled_decode import (
    CompiledDecode,
    batch_buckets,
    bucket_for,
    resolve_mode,
    width_buckets,
)
from internvl_core.engine.engine import LLMEngine
from internvl_core.engine.model_runner import ModelRunner
from internvl_core.engine.pipeline import LocalStageWorker, StageWorker
from internvl_core.model.decoder import DecoderModel
from internvl_core.model.triton_decode_attention import triton_available

FAMILIES = ["qwen2", "internlm2", "phi3", "llama"]
BLOCK = 4
MAX_NUM_SEQS = 8
MAX_MODEL_LEN = 128


def _engine(
    path: Path,
    *,
    compiled: bool,
    backend: str = "eager",
    device: str = "cpu",
    graphs: bool = False,
    pp_size: int = 1,
) -> LLMEngine:
    """An engine whose stages decode through CompiledDecode (traced by `backend`) or eagerly."""
    config = EngineConfig(
        block_size=BLOCK,
        max_num_seqs=MAX_NUM_SEQS,
        max_model_len=MAX_MODEL_LEN,
        num_kv_blocks=160,
        pp_size=pp_size,
        compile_decode="off",
    )
    arch = ModelArchitecture.from_checkpoint(path).llm

    def stage(index: int, lo: int, hi: int) -> StageWorker:
        model = DecoderModel.from_checkpoint(
            path, start_layer=lo, end_layer=hi, dtype=torch.float32, device=device, arch=arch
        )
        decode = None
        if compiled:
            decode = CompiledDecode(
                model,
                max_num_seqs=MAX_NUM_SEQS,
                max_model_len=MAX_MODEL_LEN,
                block_size=BLOCK,
                use_cuda_graphs=graphs,
                backend=backend,
            )
        return LocalStageWorker(ModelRunner(model, block_size=BLOCK, compiled_decode=decode))

    return LLMEngine.from_checkpoint(path, config, device=device, stage_factory=stage)


def _workload(num_requests: int, *, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Varied prompt lengths and output lengths, so decode batches shrink through padded buckets
    (7 rows in the 8 bucket, 3 in the 4 bucket, ...)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(1, 30))] for _ in range(7)]
    prompts = prompts[:num_requests]
    params = [SamplingParams(max_tokens=4 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    return prompts, params


def _tokens(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> Any:
    return [out.token_ids for out in engine.generate(prompts, params)]


def test_buckets() -> None:
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1000) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 1000]
    assert width_buckets(32) == [4, 8, 16, 32]
    assert width_buckets(20) == [4, 8, 16, 20]
    assert width_buckets(2) == [2]
    assert bucket_for(5, [1, 2, 4, 8]) == 8
    assert bucket_for(4, [1, 2, 4, 8]) == 4


def test_resolve_mode() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mode("auto", cpu) == "off"
    auto_cuda = "graphs" if triton_available() else "off"  # graphs need the Triton attention
    assert resolve_mode("auto", cuda) == auto_cuda
    assert resolve_mode("on", cpu) == "compiled"
    assert resolve_mode("on", cuda) == "graphs"
    assert resolve_mode("off", cuda) == "off"


def test_warm_up_compiles_every_batch_bucket_and_writes_only_scratch(
    tiny_checkpoint: Any,
) -> None:
    """At pool allocation every batch bucket is traced (CUDA: captured) over padding rows, whose
    writes land in the scratch block alone: the pool's real blocks stay untouched."""
    engine = _engine(tiny_checkpoint("qwen2"), compiled=True)
    runner = engine.pipeline.stages[0].runner
    decode = runner.compiled_decode
    assert decode is not None and runner.kv_cache is not None
    narrowest = decode.width_buckets[0]
    assert {(rows, narrowest) for rows in decode.batch_buckets} <= set(decode._buckets)
    for layer in runner.kv_cache.tensors:  # [2, num_blocks + 1, block, K, d]
        assert not layer[:, : runner.kv_cache.num_blocks].any(), "a real block was written"
        assert layer[:, runner.kv_cache.num_blocks].any(), "padding rows write the scratch block"


@pytest.mark.parametrize("family", FAMILIES)
def test_fullgraph_tokens_equal_eager(family: str, tiny_checkpoint: Any) -> None:
    """Every family traces with fullgraph=True (a graph break raises) and decodes the same
    greedy tokens as eager, with async run-ahead placeholders filled on the device."""
    path = tiny_checkpoint(family)
    prompts, params = _workload(7)
    expected = _tokens(_engine(path, compiled=False), prompts, params)
    engine = _engine(path, compiled=True)
    assert _tokens(engine, prompts, params) == expected
    runner = engine.pipeline.stages[0].runner
    assert runner.kv_cache.tensors[0].shape[1] == runner.kv_cache.num_blocks + 1  # scratch


def test_phi3_long_rope_switch_inside_the_graph(tiny_checkpoint: Any, tmp_path: Path) -> None:
    """Sequences cross original_max_position_embeddings while decoding: the per-row long/short
    choice is a tensor inside the graph, not a Python branch."""
    source = tiny_checkpoint("phi3")
    path = tmp_path / "phi3_short_original"
    path.mkdir()
    for item in source.iterdir():
        (path / item.name).write_bytes(item.read_bytes())
    config = json.loads((path / "config.json").read_text())
    config["llm_config"]["original_max_position_embeddings"] = 24
    (path / "config.json").write_text(json.dumps(config))
    prompts, params = _workload(6, seed=3)
    expected = _tokens(_engine(path, compiled=False), prompts, params)
    assert _tokens(_engine(path, compiled=True), prompts, params) == expected


def test_pp2_stages_compiled_equal_eager(tiny_checkpoint: Any) -> None:
    """A later stage takes hidden states into its persistent buffer; the first returns them."""
    path = tiny_checkpoint("llama", num_llm_layers=3)
    prompts, params = _workload(5, seed=1)
    expected = _tokens(_engine(path, compiled=False), prompts, params)
    assert _tokens(_engine(path, compiled=True, pp_size=2), prompts, params) == expected


@pytest.mark.slow
def test_inductor_tokens_equal_eager(tiny_checkpoint: Any) -> None:
    """The production backend (inductor C++ kernels) on Qwen2."""
    path = tiny_checkpoint("qwen2")
    prompts, params = _workload(7, seed=2)
    expected = _tokens(_engine(path, compiled=False), prompts, params)
    assert _tokens(_engine(path, compiled=True, backend="inductor"), prompts, params) == expected


@pytest.mark.gpu
def test_cuda_graphs_tokens_equal_eager(tiny_checkpoint: Any) -> None:
    """One CUDA graph per bucket, replayed: the same greedy tokens as the eager CUDA path."""
    path = tiny_checkpoint("qwen2")
    prompts, params = _workload(7, seed=4)
    expected = _tokens(_engine(path, compiled=False, device="cuda"), prompts, params)
    engine = _engine(path, compiled=True, backend="inductor", device="cuda", graphs=True)
    assert _tokens(engine, prompts, params) == expected
    decode = engine.pipeline.stages[0].runner.compiled_decode
    assert decode is not None and decode._graphs, "decode steps replayed captured graphs"


@pytest.mark.gpu
def test_auto_mode_on_cuda_decodes_through_graphs_with_eager_tokens(tiny_checkpoint: Any) -> None:
    """The default config on CUDA: graphs (Triton attention), warmed at start, the KV plan
    measured with the graphs' reserve; greedy tokens equal compile_decode="off"."""
    path = tiny_checkpoint("qwen2")
    prompts, params = _workload(7, seed=5)

    def engine(mode: str, num_kv_blocks: int | None) -> LLMEngine:
        config = EngineConfig(
            block_size=16,
            max_num_seqs=MAX_NUM_SEQS,
            max_model_len=MAX_MODEL_LEN,
            gpu_memory_utilization=0.2,
            num_kv_blocks=num_kv_blocks,
            compile_decode=mode,  # type: ignore[arg-type]
        )
        return LLMEngine.from_checkpoint(path, config, device="cuda")  # fp32: exact tokens

    # The reference engine gets a small fixed pool: a measured plan would see its live pool.
    expected = _tokens(engine("off", num_kv_blocks=256), prompts, params)
    gc.collect()
    torch.cuda.empty_cache()
    graphs = engine("auto", num_kv_blocks=None)  # measured plan, graphs' reserve included
    decode = graphs.pipeline.stages[0].runner.compiled_decode
    assert decode is not None and decode.use_cuda_graphs
    assert len(decode._graphs) >= len(decode.batch_buckets), "every batch bucket captured"
    assert _tokens(graphs, prompts, params) == expected
