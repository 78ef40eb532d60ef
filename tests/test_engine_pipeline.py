"""Pipeline: chained in-process stages equal one stage; KV pools sized to the smallest stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams
from internvl_core.engine.batch import SamplingRequest, ScheduledBatch, StageOutput
from internvl_core.engine.model_runner import ModelRunner
from internvl_core.engine.pipeline import LocalStageWorker, Pipeline, split_layers
from internvl_core.errors import InvalidRequestError
from internvl_core.model.decoder import DecoderModel

BLOCK = 4


def _pipeline(path: Path, ranges: list[tuple[int, int]]) -> Pipeline:
    arch = ModelArchitecture.from_checkpoint(path).llm
    stages = []
    for lo, hi in ranges:
        model = DecoderModel.from_checkpoint(
            path, start_layer=lo, end_layer=hi, dtype=torch.float32, arch=arch
        )
        stages.append(LocalStageWorker(ModelRunner(model, block_size=BLOCK)))
    return Pipeline(stages)


def _batch(batch_id: int, tokens: list[list[int]], contexts: list[int]) -> ScheduledBatch:
    tables = [[2 * i, 2 * i + 1, 2 * i + 8] for i in range(len(tokens))]
    return ScheduledBatch(
        batch_id=batch_id,
        request_ids=[f"r{i}" for i in range(len(tokens))],
        input_token_ids=[t for seq in tokens for t in seq],
        query_lens=[len(seq) for seq in tokens],
        context_lens=contexts,
        prompt_lens=[c + len(seq) for c, seq in zip(contexts, tokens, strict=True)],
        block_tables=tables,
        sample_flags=[True] * len(tokens),
        sampling=[
            SamplingRequest(f"r{i}", SamplingParams(), [], [], ()) for i in range(len(tokens))
        ],
        block_size=BLOCK,
    )


def test_split_layers() -> None:
    assert split_layers(4, 1) == [(0, 4)]
    assert split_layers(4, 2) == [(0, 2), (2, 4)]
    assert split_layers(5, 3) == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(InvalidRequestError, match="pp_size is 5; it must be between 1 and"):
        split_layers(4, 5)


def test_stages_chain_like_one_stage(tiny_checkpoint: Any) -> None:
    path = tiny_checkpoint("llama", num_llm_layers=3)
    pipes = {
        1: _pipeline(path, [(0, 3)]),
        2: _pipeline(path, [(0, 2), (2, 3)]),
        3: _pipeline(path, [(0, 1), (1, 2), (2, 3)]),
    }
    results = {}
    for pp, pipe in pipes.items():
        assert pipe.pp_size == pp
        assert pipe.init_kv_cache(EngineConfig(block_size=BLOCK, num_kv_blocks=16)) == 16
        prefill = pipe.fetch(pipe.submit(_batch(0, [[1, 2, 3, 4, 5], [6, 7]], [0, 0])))
        nxt = prefill.token_ids
        decode = pipe.fetch(pipe.submit(_batch(1, [[nxt[0]], [nxt[1]]], [5, 2])))
        results[pp] = (prefill.token_ids, decode.token_ids)
    assert results[1] == results[2] == results[3]
    # The hidden states handed between stages are what a single stage computes at that depth.
    first = pipes[3].stages[0]
    assert isinstance(first, LocalStageWorker)
    out = first.submit(_batch(2, [[9, 9]], [0]), None)
    assert isinstance(out, StageOutput) and out.hidden_states is not None
    assert out.hidden_states.shape == (2, first.runner.model.arch.hidden_size)


def test_kv_pool_is_sized_by_the_smallest_stage(tiny_checkpoint: Any) -> None:
    path = tiny_checkpoint("llama", num_llm_layers=3)
    pipe = _pipeline(path, [(0, 2), (2, 3)])
    bytes_two_layers = pipe.stages[0].runner.kv_block_bytes()  # type: ignore[attr-defined]
    config = EngineConfig(block_size=BLOCK, kv_cache_memory_bytes=5 * bytes_two_layers)
    # Stage 0 (2 layers) fits 5 blocks, stage 1 (1 layer) 10: both get 5.
    assert pipe.init_kv_cache(config) == 5
    for stage in pipe.stages:
        cache = stage.runner.kv_cache  # type: ignore[attr-defined]
        assert cache is not None and cache.num_blocks == 5
