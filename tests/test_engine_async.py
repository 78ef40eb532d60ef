"""AsyncLLMEngine: streaming, abort, a consumer that goes away frees its blocks, dead loop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams
from internvl_core.engine.async_engine import AsyncLLMEngine
from internvl_core.engine.batch import ScheduledBatch, StageOutput
from internvl_core.engine.engine import LLMEngine
from internvl_core.engine.outputs import RequestOutput
from internvl_core.engine.pipeline import Pipeline
from internvl_core.errors import ContextLengthError, EngineDeadError

BLOCKS = 64


@pytest.fixture(scope="module")
def engine(tiny_qwen2: Path) -> LLMEngine:
    config = EngineConfig(block_size=4, num_kv_blocks=BLOCKS, max_model_len=256)
    return LLMEngine.from_checkpoint(tiny_qwen2, config)


@pytest.fixture
def async_engine(engine: LLMEngine) -> Any:
    wrapped = AsyncLLMEngine(engine)
    yield wrapped
    assert not engine.has_unfinished()
    assert engine.stats.kv_blocks_free == BLOCKS, "leaked KV blocks"


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


async def _collect(
    engine: AsyncLLMEngine, rid: str, prompt: list[int], n: int
) -> list[RequestOutput]:
    return [out async for out in engine.generate(rid, prompt, _params(n))]


async def _drain(engine: AsyncLLMEngine) -> None:
    """Let the loop finish any pending work (e.g. report an abort)."""
    for _ in range(200):
        if not engine.engine.has_unfinished():
            return
        await asyncio.sleep(0.01)


def test_streams_match_offline_generate(engine: LLMEngine, async_engine: AsyncLLMEngine) -> None:
    prompts = [list(range(10, 30)), list(range(40, 47)), list(range(5, 60))]
    expected = [o.token_ids for o in engine.generate(prompts, _params(12))]

    async def main() -> list[list[RequestOutput]]:
        jobs = [_collect(async_engine, f"r{i}", p, 12) for i, p in enumerate(prompts)]
        results = await asyncio.gather(*jobs)
        await async_engine.shutdown()
        return results

    streams = asyncio.run(main())
    for outs, want in zip(streams, expected, strict=True):
        assert [t for o in outs for t in o.token_ids] == want
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert all(not o.finished for o in outs[:-1])


def test_consumer_that_stops_frees_blocks(engine: LLMEngine, async_engine: AsyncLLMEngine) -> None:
    async def main() -> tuple[int, int, list[RequestOutput]]:
        other = asyncio.create_task(_collect(async_engine, "keep", list(range(7, 17)), 20))
        stream = async_engine.generate("gone", list(range(20, 60)), _params(100))
        async for _ in stream:
            break
        used_before = BLOCKS - engine.stats.kv_blocks_free
        await stream.aclose()  # what `async for ... break` leads to once the generator is dropped
        # Applied at once, or right after the step running in the worker thread returns.
        for _ in range(100):
            used_after = BLOCKS - engine.stats.kv_blocks_free
            if used_after <= 8:
                break
            await asyncio.sleep(0.005)
        kept = await other
        await _drain(async_engine)
        await async_engine.shutdown()
        return used_before, used_after, kept

    before, after, kept = asyncio.run(main())
    # "gone" held 10+ blocks for 40 prompt tokens; they are released at once (the survivor holds
    # at most 8 blocks for 30 tokens).
    assert before - after >= 10 and after <= 8
    assert kept[-1].finish_reason == "length" and kept[-1].num_output_tokens == 20
    solo = engine.generate([list(range(7, 17))], _params(20))[0].token_ids
    assert [t for o in kept for t in o.token_ids] == solo


def test_break_without_aclose_aborts_via_finalizer(
    engine: LLMEngine, async_engine: AsyncLLMEngine
) -> None:
    async def main() -> None:
        async for _ in async_engine.generate("dropped", list(range(20, 60)), _params(100)):
            break  # the generator is unreferenced now; asyncio's finalizer hook closes it
        for _ in range(200):
            if engine.stats.kv_blocks_free == BLOCKS and not engine.has_unfinished():
                break
            await asyncio.sleep(0.005)
        assert engine.stats.kv_blocks_free == BLOCKS
        await async_engine.shutdown()

    asyncio.run(main())


def test_cancelled_consumer_task_aborts(engine: LLMEngine, async_engine: AsyncLLMEngine) -> None:
    async def main() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in async_engine.generate("c", list(range(5, 45)), _params(200)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _drain(async_engine)
        assert engine.stats.kv_blocks_free == BLOCKS
        await async_engine.shutdown()

    asyncio.run(main())


def test_explicit_abort_ends_the_stream(async_engine: AsyncLLMEngine) -> None:
    async def main() -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        async for out in async_engine.generate("x", list(range(5, 15)), _params(200)):
            outs.append(out)
            if len(outs) == 2:
                await async_engine.abort("x")
        await async_engine.shutdown()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert len(outs) <= 4


def test_admission_errors_raise_in_the_caller(async_engine: AsyncLLMEngine) -> None:
    async def main() -> None:
        with pytest.raises(ContextLengthError, match="max_model_len 256"):
            async for _ in async_engine.generate("big", [1] * 250, _params(10)):
                pass
        await async_engine.shutdown()

    asyncio.run(main())


class _BrokenStage:
    """A stage whose device fails: a fake across the StageWorker protocol boundary."""

    def plan_kv_blocks(self, config: EngineConfig) -> int:
        return 8

    def init_kv_cache(self, num_blocks: int) -> None:
        pass

    def submit(self, batch: ScheduledBatch, prev: Any, sources: Sequence[Any] = ()) -> Any:
        raise RuntimeError("device lost")

    def fetch(self, handle: Any) -> StageOutput:
        raise AssertionError("unreachable")


def test_dead_loop_fails_streams_and_health(tiny_qwen2: Path) -> None:
    arch = ModelArchitecture.from_checkpoint(tiny_qwen2).llm
    broken = LLMEngine(
        Pipeline([_BrokenStage()]),
        None,
        EngineConfig(block_size=4),
        eos_token_ids=(),
        image_token_id=None,
        model_arch=arch,
    )
    wrapped = AsyncLLMEngine(broken)
    wrapped.check_health()

    async def main() -> None:
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in wrapped.generate("a", [1, 2, 3], _params(4)):
                pass
        with pytest.raises(EngineDeadError):
            wrapped.check_health()
        with pytest.raises(EngineDeadError):
            async for _ in wrapped.generate("b", [1, 2, 3], _params(4)):
                pass

    asyncio.run(main())
