"""LLMEngine exactness: continuous batching, chunked prefill, preemption, prefix hits, images and
pipeline stages all give the greedy tokens of decoding each request alone; plus API behaviour."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from internvl_core.config import EngineConfig, SamplingParams
from internvl_core.engine.batch import ScheduledBatch
from internvl_core.engine.engine import LLMEngine
from internvl_core.engine.pipeline import PendingBatch
from internvl_core.errors import ContextLengthError, EngineOverloadedError, InvalidRequestError

FAMILIES = ["qwen2", "internlm2", "phi3", "llama"]
BLOCK = 4


@dataclass
class Workload:
    prompts: list[list[int]]
    params: list[SamplingParams]
    images: list[torch.Tensor | None]


def _engine(path: Path, **config: Any) -> LLMEngine:
    return LLMEngine.from_checkpoint(path, EngineConfig(block_size=BLOCK, **config))


def _alone(path: Path) -> LLMEngine:
    """The reference: one request at a time, whole prompts, plenty of blocks, no caching."""
    return _engine(
        path,
        max_num_seqs=1,
        enable_chunked_prefill=False,
        enable_prefix_caching=False,
        max_num_batched_tokens=512,
        num_kv_blocks=256,
    )


def _workload(engine: LLMEngine, num_requests: int, *, seed: int = 0) -> Workload:
    """Mixed lengths; a shared system prefix (prefix hits); some requests carry images, two of
    them the same image after the same prefix, the others distinct ones."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    image_id = engine.image_token_id
    assert image_id is not None
    vocab = [t for t in range(3, 380) if t != image_id]
    system = [rng.choice(vocab) for _ in range(10)]
    width = engine.model_arch.hidden_size
    shared_image = torch.randn(8, width, generator=gen)  # [image tokens, D]
    prompts, params, images = [], [], []
    for i in range(num_requests):
        text = [rng.choice(vocab) for _ in range(rng.randint(1, 40))]
        image = None
        if i % 3 == 1:
            image = shared_image if i % 2 else torch.randn(8, width, generator=gen)  # [8, D]
            prompts.append([*system, image_id, *[image_id] * 7, *text])
        else:
            prompts.append([*system, *text] if i % 2 else text)
        images.append(image)
        params.append(SamplingParams(max_tokens=rng.randint(2, 16), ignore_eos=i % 4 == 0))
    return Workload(prompts, params, images)


def _tokens(engine: LLMEngine, work: Workload) -> list[list[int]]:
    done = engine.generate(work.prompts, work.params, image_embeds=work.images)
    return [out.token_ids for out in done]


def _spy_batches(engine: LLMEngine) -> list[ScheduledBatch]:
    """Every batch the engine submits from now on."""
    batches: list[ScheduledBatch] = []
    submit = engine.pipeline.submit

    def spy(batch: ScheduledBatch, sources: Sequence[PendingBatch] = ()) -> PendingBatch:
        batches.append(batch)
        return submit(batch, sources)

    engine.pipeline.submit = spy  # type: ignore[method-assign]
    return batches


def _ran_ahead(batches: list[ScheduledBatch]) -> int:
    return sum(len(batch.deferred_token_rows) for batch in batches)


def _assert_drained(engine: LLMEngine) -> None:
    assert not engine.has_unfinished()
    stats = engine.stats
    assert stats.kv_blocks_free == stats.kv_blocks_total, "leaked KV blocks"
    assert stats.num_waiting == stats.num_running == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_alone(tiny_checkpoint: Any, family: str) -> None:
    path = tiny_checkpoint(family)
    ref_engine = _alone(path)
    work = _workload(ref_engine, 20)
    expected = _tokens(ref_engine, work)
    engine = _engine(path, max_num_seqs=16, max_num_batched_tokens=24, num_kv_blocks=40)
    got = _tokens(engine, work)
    assert got == expected
    stats = engine.stats
    assert stats.num_preemptions > 0, "the KV budget should force preemption"
    assert stats.prefix_cache_hit_rate > 0, "the shared prefix should hit the cache"
    _assert_drained(engine)
    # Run the same workload again: now most prompts are cached, results unchanged.
    assert _tokens(engine, work) == expected
    _assert_drained(engine)


@pytest.mark.parametrize("pp_size", [2, 3])
def test_pipeline_parallel_equals_pp1(tiny_checkpoint: Any, pp_size: int) -> None:
    path = tiny_checkpoint("qwen2", num_llm_layers=3)
    config = {"max_num_seqs": 8, "max_num_batched_tokens": 32, "num_kv_blocks": 30}
    pp1 = _engine(path, **config)
    work = _workload(pp1, 16, seed=1)
    expected = _tokens(pp1, work)
    engine = _engine(path, pp_size=pp_size, **config)
    assert engine.pipeline.pp_size == pp_size
    batches = _spy_batches(engine)
    assert _tokens(engine, work) == expected
    assert engine.stats.num_preemptions > 0 and engine.stats.prefix_cache_hit_rate > 0
    assert _ran_ahead(batches) > 0, "micro-batches queued again on in-flight samples"
    _assert_drained(engine)


def test_seeded_sampling_ignores_batch_composition(tiny_qwen2: Path) -> None:
    ref_engine = _alone(tiny_qwen2)
    work = _workload(ref_engine, 12, seed=2)
    sampled = [i for i in range(12) if i % 2 == 0]
    for i in sampled:
        work.params[i] = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=100 + i)
    alone = _tokens(ref_engine, work)
    batched = _tokens(_engine(tiny_qwen2, max_num_batched_tokens=16, num_kv_blocks=40), work)
    assert batched == alone
    # Another composition: only the seeded requests, in reverse order.
    sub = Workload(
        [work.prompts[i] for i in reversed(sampled)],
        [work.params[i] for i in reversed(sampled)],
        [work.images[i] for i in reversed(sampled)],
    )
    assert _tokens(_engine(tiny_qwen2, num_kv_blocks=64), sub) == [
        alone[i] for i in reversed(sampled)
    ]


def test_streaming_outputs_and_stop_rules(tiny_qwen2: Path) -> None:
    engine = _engine(tiny_qwen2, num_kv_blocks=64)
    prompt = list(range(10, 30))
    probe = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(probe.token_ids) == 8 and probe.finish_reason == "length"
    # Make the 3rd generated token a stop id: generation ends there, the token included.
    stop_id = probe.token_ids[2]
    params = SamplingParams(max_tokens=8, stop_token_ids=(stop_id,), logprobs=True, top_logprobs=2)
    engine.add_request("a", prompt, params)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    tokens = [t for o in outs for t in o.token_ids]
    assert tokens == probe.token_ids[: probe.token_ids.index(stop_id) + 1]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert outs[-1].stop_reason == stop_id
    assert all(o.logprobs is not None and len(o.logprobs) == 1 for o in outs)
    assert all(o.top_logprobs is not None and len(o.top_logprobs[0]) == 2 for o in outs)
    assert [o.num_output_tokens for o in outs] == list(range(1, len(outs) + 1))
    assert outs[0].num_prompt_tokens == 20
    # The text deltas concatenate to the decode of the output ids (special tokens skipped).
    assert engine.tokenizer is not None
    text = "".join(o.text_delta for o in outs)
    assert text == engine.tokenizer.decode(tokens, skip_special_tokens=True)
    _assert_drained(engine)


def test_request_extensions_change_the_output(tiny_qwen2: Path) -> None:
    """vLLM's request fields work end to end: ignore_eos runs to max_tokens, a stop string is
    kept with include_stop_str_in_output."""
    engine = _engine(tiny_qwen2, num_kv_blocks=64)
    assert engine.tokenizer is not None
    prompt = list(range(10, 30))
    forced = SamplingParams(max_tokens=12, ignore_eos=True, min_tokens=12)
    probe = engine.generate([prompt], forced)[0]
    assert len(probe.token_ids) == 12 and probe.finish_reason == "length"
    text = engine.tokenizer.decode(probe.token_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    cut, kept = engine.generate(
        [prompt, prompt],
        [
            forced.model_copy(update={"stop": (stop,), "min_tokens": 0}),
            forced.model_copy(
                update={"stop": (stop,), "min_tokens": 0, "include_stop_str_in_output": True}
            ),
        ],
    )
    assert text.startswith(kept.text) and kept.text.endswith(stop)
    assert kept.text == cut.text + stop and cut.finish_reason == kept.finish_reason == "stop"
    _assert_drained(engine)


def test_eos_is_the_template_separator(tiny_qwen2: Path) -> None:
    engine = _engine(tiny_qwen2, num_kv_blocks=32)
    assert engine.tokenizer is not None
    assert engine.eos_token_ids == (engine.tokenizer.token_to_id("<|im_end|>"),)
    assert engine.image_token_id == engine.tokenizer.token_to_id("<IMG_CONTEXT>")


def test_refuses_what_can_never_fit(tiny_qwen2: Path) -> None:
    engine = _engine(tiny_qwen2, num_kv_blocks=8, max_model_len=64)
    with pytest.raises(
        ContextLengthError, match=r"60 tokens and max_tokens is 10: 70 > max_model_len 64"
    ):
        engine.add_request("a", [1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(
        ContextLengthError, match="needs 9 KV blocks of 4 tokens; the KV pool has 8"
    ):
        engine.add_request("b", [1] * 30, SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError, match="image_embeds width is 3"):
        ids = [engine.image_token_id or 0] * 2
        engine.add_request("c", ids, SamplingParams(max_tokens=2), image_embeds=torch.zeros(2, 3))
    engine.add_request("d", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="'d' is already in use"):
        engine.add_request("d", [1, 2], SamplingParams(max_tokens=2))
    engine.abort("d")
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "abort"
    _assert_drained(engine)


def test_abort_frees_blocks_at_once(tiny_qwen2: Path) -> None:
    engine = _engine(tiny_qwen2, num_kv_blocks=32)
    engine.add_request("a", list(range(5, 25)), SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("b", list(range(5, 15)), SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats.kv_blocks_free < 32
    engine.abort("a")
    free_after_abort = engine.stats.kv_blocks_free
    engine.abort("unknown")  # no-op
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert {o.request_id for o in outs if o.finished} == {"a", "b"}
    assert free_after_abort > 32 - 8
    _assert_drained(engine)


def test_waiting_queue_bound_and_stats(tiny_qwen2: Path) -> None:
    engine = _engine(tiny_qwen2, num_kv_blocks=16, max_waiting_requests=2)
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2))
    engine.add_request("b", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(EngineOverloadedError, match="2 requests are waiting; max_waiting_requests"):
        engine.add_request("c", [1, 2, 3], SamplingParams(max_tokens=2))
    stats = engine.stats
    assert (stats.num_waiting, stats.kv_blocks_total, stats.kv_block_size) == (2, 16, BLOCK)
    engine.step()
    assert engine.stats.num_running == 2 and engine.stats.kv_usage > 0
    while engine.has_unfinished():
        engine.step()
    _assert_drained(engine)


# ---- async scheduling: results read back one step behind the device ----------------------------
def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outs: dict[str, list[Any]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id].append(out)
    return outs


def _summary(outs: list[Any]) -> tuple[list[int], str, str | None, Any]:
    tokens = [t for o in outs for t in o.token_ids]
    last = outs[-1]
    assert last.finished and not any(o.finished for o in outs[:-1])
    return tokens, "".join(o.text_delta for o in outs), last.finish_reason, last.stop_reason


@pytest.mark.parametrize("pp_size", [1, 2])
def test_async_scheduling_equals_one_batch_at_a_time(tiny_qwen2: Path, pp_size: int) -> None:
    """Placeholder tokens fed from in-flight batches' samples give the same tokens and text;
    preemption happens with a step in flight; no block leaks. At PP=2 each micro-batch is
    queued again before the host has read its tokens (2 * pp_size batches in flight)."""
    config = EngineConfig(
        block_size=BLOCK,
        max_num_seqs=16,
        max_num_batched_tokens=24,
        num_kv_blocks=40,
        pp_size=pp_size,
    )
    sync = LLMEngine.from_checkpoint(tiny_qwen2, config, async_scheduling=False)
    engine = LLMEngine.from_checkpoint(tiny_qwen2, config)
    assert (sync.max_in_flight, engine.max_in_flight) == (pp_size, 2 * pp_size)
    batches = _spy_batches(engine)
    work = _workload(sync, 20, seed=3)
    assert _tokens(engine, work) == _tokens(sync, work)
    assert engine.stats.num_preemptions > 0, "the KV budget should force preemption"
    assert _ran_ahead(batches) > 0
    for batch in batches:  # stage 0 never waits for a batch still ahead of it
        assert all(s <= batch.batch_id - pp_size for s in batch.deferred_source_batch_ids)
    _assert_drained(engine)


@pytest.mark.parametrize("pp_size", [1, 2])
@pytest.mark.parametrize("max_tokens", range(1, 7))
def test_async_max_tokens_at_every_position(
    tiny_qwen2: Path, max_tokens: int, pp_size: int
) -> None:
    engine = _engine(tiny_qwen2, num_kv_blocks=64, pp_size=pp_size)
    prompt = list(range(10, 30))
    ref = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    # Two requests so the engine always has another batch in flight.
    outs = _run(
        engine,
        {
            "a": (prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)),
            "b": (list(range(40, 50)), SamplingParams(max_tokens=7, ignore_eos=True)),
        },
    )
    tokens, _, reason, _ = _summary(outs["a"])
    assert tokens == ref.token_ids[:max_tokens] and reason == "length"
    _assert_drained(engine)


@pytest.mark.parametrize("pp_size", [1, 2])
def test_async_stop_string_at_every_position(tiny_qwen2: Path, pp_size: int) -> None:
    """A stop string seen by the output side ends the request exactly, wherever it falls among
    the steps already queued on its in-flight samples."""
    engine = _engine(tiny_qwen2, num_kv_blocks=64, pp_size=pp_size)
    prompt = list(range(10, 30))
    neighbour = (list(range(40, 50)), SamplingParams(max_tokens=12, ignore_eos=True))
    ref = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert engine.tokenizer is not None
    checked = 0
    for end in range(1, len(ref.text) + 1):
        stop = ref.text[max(0, end - 2) : end]
        if not stop.strip() or "\ufffd" in stop or ref.text.find(stop) != end - len(stop):
            continue  # only the first occurrence ends the text here
        params = SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop])
        outs = _run(engine, {"a": (prompt, params), "b": neighbour})
        tokens, text, reason, stop_reason = _summary(outs["a"])
        assert (text, reason, stop_reason) == (ref.text[: end - len(stop)], "stop", stop)
        assert tokens == ref.token_ids[: len(tokens)]
        assert stop in engine.tokenizer.decode(tokens)
        _assert_drained(engine)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("pp_size", [1, 2])
def test_async_abort_while_its_step_is_in_flight(tiny_qwen2: Path, pp_size: int) -> None:
    engine = _engine(tiny_qwen2, num_kv_blocks=64, pp_size=pp_size)
    prompt_b = list(range(40, 50))
    ref_b = engine.generate([prompt_b], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    engine.add_request("a", list(range(10, 30)), SamplingParams(max_tokens=20, ignore_eos=True))
    engine.add_request("b", prompt_b, SamplingParams(max_tokens=10, ignore_eos=True))
    outs: list[Any] = []
    for _ in range(3):
        outs.extend(engine.step())
    run_ahead = [
        pending.batch.request_ids[row]
        for pending in engine._in_flight
        for row in pending.batch.deferred_token_rows  # decode rows: token row = sequence row
    ]
    assert "a" in run_ahead, "a step of a on an in-flight sample of a is on the device"
    engine.abort("a")
    while engine.has_unfinished():
        outs.extend(engine.step())
    a_outs = [o for o in outs if o.request_id == "a"]
    assert a_outs[-1].finish_reason == "abort" and sum(o.finished for o in a_outs) == 1
    assert _summary([o for o in outs if o.request_id == "b"])[0] == ref_b.token_ids
    _assert_drained(engine)


@pytest.mark.parametrize("pp_size", [1, 2])
def test_async_stop_id_at_every_position(tiny_qwen2: Path, pp_size: int) -> None:
    """The vectorised token-level check ends a request at its first stop id, wherever it falls
    in the run-ahead; stop-table rows are all returned."""
    engine = _engine(tiny_qwen2, num_kv_blocks=64, pp_size=pp_size)
    prompt = list(range(10, 30))
    neighbour = (list(range(40, 50)), SamplingParams(max_tokens=10, ignore_eos=True))
    ref = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    checked = 0
    for k, token in enumerate(ref.token_ids):
        if ref.token_ids.index(token) != k:
            continue  # an earlier occurrence would stop first
        params = SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=[token])
        outs = _run(engine, {"a": (prompt, params), "b": neighbour})
        tokens, _, reason, stop_reason = _summary(outs["a"])
        assert (tokens, reason, stop_reason) == (ref.token_ids[: k + 1], "stop", token)
        _assert_drained(engine)
        assert engine._token_stops.num_live == 0, "stop rows leaked"
        checked += 1
    assert checked >= 3
