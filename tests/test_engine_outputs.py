"""What the engine reports besides tokens: each output's queue time (arrival to first scheduled)
and the cumulative prefix-cache counters a reader turns into a recent hit rate."""

from __future__ import annotations

from pathlib import Path

from internvl_core.config import EngineConfig, SamplingParams
from internvl_core.engine.engine import LLMEngine
from internvl_core.engine.outputs import RequestOutput

BLOCK = 4


def _run(engine: LLMEngine) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def test_queue_time_is_arrival_to_first_scheduled(tiny_qwen2: Path) -> None:
    config = EngineConfig(block_size=BLOCK, max_num_seqs=1, num_kv_blocks=32)
    engine = LLMEngine.from_checkpoint(tiny_qwen2, config)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request("a", list(range(5, 15)), params)
    engine.add_request("b", list(range(5, 15)), params)  # waits until "a" has finished
    outputs = _run(engine)
    queue = {rid: {o.queue_time_s for o in outputs if o.request_id == rid} for rid in "ab"}
    assert all(len(times) == 1 and None not in times for times in queue.values())
    (a,), (b,) = queue["a"], queue["b"]
    assert 0.0 <= a < b


def test_prefix_counters_are_cumulative_tokens(tiny_qwen2: Path) -> None:
    engine = LLMEngine.from_checkpoint(tiny_qwen2, EngineConfig(block_size=BLOCK, num_kv_blocks=32))
    prompt = list(range(5, 18))  # 13 tokens: 3 full blocks can be looked up
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    engine.add_request("first", prompt, params)
    _run(engine)
    first = engine.stats
    assert (first.prefix_cache_queried_tokens, first.prefix_cache_hit_tokens) == (12, 0)
    engine.add_request("again", prompt, params)
    _run(engine)
    again = engine.stats
    assert (again.prefix_cache_queried_tokens, again.prefix_cache_hit_tokens) == (24, 12)
