"""Structured outputs in the engine: every constrained request of every tokenizer family ends in
JSON that parses and validates; unconstrained neighbours keep their tokens; preemption, PP=2,
aborts and ignore_eos keep the matchers right.

Random weights ramble, so termination comes from the schemas: every string has a bounded
pattern or an enum, every number a range, every array maxItems, and whitespace is fixed, so each
grammar has a longest output (under 200 tokens here) and max_tokens is above it: the grammar,
not max_tokens, ends every request. (Free strings are left out on purpose: xgrammar counts a
UTF-8-encoded surrogate, which random bytes can form, as one character, while the detokenizer
renders it as three U+FFFD, so `maxLength` could be off; real models do not emit such bytes.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from internvl_core.config import EngineConfig, SamplingParams, StructuredOutput
from internvl_core.engine.engine import LLMEngine
from internvl_core.engine.structured import StructuredOutputs
from internvl_core.errors import InvalidRequestError

FAMILIES = ["qwen2", "internlm2", "phi3", "llama"]
MAX_TOKENS = 400
WORD = {"type": "string", "pattern": "^[a-z]{1,8}$"}

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "member": {"type": "boolean"},
        },
        "required": ["name", "age", "member"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 9999},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Shanghai", "Lima"]},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    "geo": {
                        "type": "object",
                        "properties": {
                            "lat": {"type": "number", "minimum": -90, "maximum": 90},
                            "lon": {"type": "number", "minimum": -180, "maximum": 180},
                        },
                        "required": ["lat", "lon"],
                    },
                },
                "required": ["city", "zip", "geo"],
            },
        },
        "required": ["id", "address"],
    },
    "receipt": {
        "type": "object",
        "properties": {
            "merchant": {"type": "string", "pattern": "^[A-Z][A-Za-z]{2,11}$"},
            "date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]$"},
            "currency": {"enum": ["USD", "EUR", "CNY"]},
            "lines": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                        "price": {"type": "number", "minimum": 0, "maximum": 1000},
                    },
                    "required": ["sku", "qty", "price"],
                },
            },
            "total": {"type": "number", "minimum": 0, "maximum": 100000},
        },
        "required": ["merchant", "date", "currency", "lines", "total"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "status": {"enum": ["open", "closed", "pending"]},
            "priority": {"enum": [1, 2, 3]},
            "flag": {"const": "ok"},
            "note": {"anyOf": [WORD, {"type": "null"}]},
        },
        "required": ["status", "priority", "flag", "note"],
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": WORD, "maxItems": 4},
            "matrix": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "array",
                    "maxItems": 3,
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                },
            },
        },
        "required": ["tags", "matrix"],
    },
    "optional_and_refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -50, "maximum": 50},
                    "y": {"type": "integer", "minimum": -50, "maximum": 50},
                },
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {
            "start": {"$ref": "#/$defs/point"},
            "end": {"$ref": "#/$defs/point"},
            "label": WORD,
        },
        "required": ["start", "end"],
    },
}


def _engine(path: Path, **config: Any) -> LLMEngine:
    defaults = {"block_size": 4, "num_kv_blocks": 1024, "max_num_seqs": 64}
    return LLMEngine.from_checkpoint(path, EngineConfig(**{**defaults, **config}))


def _structured(engine: LLMEngine) -> StructuredOutputs:
    return engine.pipeline.stages[-1].runner.structured  # type: ignore[attr-defined]


def _spec(name: str) -> StructuredOutput:
    return StructuredOutput(type="json_schema", json_schema=SCHEMAS[name])


def _params(name: str, index: int, **extra: Any) -> SamplingParams:
    """Greedy, sampled, top-p and penalised rows, all seeded."""
    variants: list[dict[str, Any]] = [
        {"temperature": 0.0},
        {"temperature": 1.0, "seed": index},
        {"temperature": 0.8, "top_p": 0.9, "seed": index},
        {"temperature": 1.0, "top_k": 20, "repetition_penalty": 1.2, "seed": index},
    ]
    fields = {"max_tokens": MAX_TOKENS, **variants[index % 4], **extra}
    return SamplingParams(structured_output=_spec(name), **fields)


def _prompts(engine: LLMEngine, num: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    assert engine.tokenizer is not None
    words = ["describe", "the", "receipt", "cat", "json", "please", "image", "a", "red", "chair"]
    return [
        engine.tokenizer.encode(" ".join(rng.choices(words, k=rng.randint(1, 12))))
        for _ in range(num)
    ]


def _assert_valid(text: str, schema: dict[str, Any]) -> None:
    jsonschema.validate(json.loads(text), schema)


def _assert_drained(engine: LLMEngine) -> None:
    assert not engine.has_unfinished()
    stats = engine.stats
    assert stats.kv_blocks_free == stats.kv_blocks_total, "leaked KV blocks"


def _run_and_validate(engine: LLMEngine, num_requests: int, seed: int) -> None:
    """`num_requests` over the schemas in turn, one continuous batch; every one must validate,
    as streamed (the joined per-step text deltas) and as decoded whole at the end."""
    assert engine.tokenizer is not None
    names = list(SCHEMAS)
    chosen = [names[i % len(names)] for i in range(num_requests)]
    prompts = _prompts(engine, len(chosen), seed=seed)
    done = engine.generate(prompts, [_params(n, i + seed) for i, n in enumerate(chosen)])
    for name, out in zip(chosen, done, strict=True):
        assert out.finish_reason == "stop", (name, out.text)
        _assert_valid(out.text, SCHEMAS[name])
        _assert_valid(engine.tokenizer.decode(out.token_ids), SCHEMAS[name])
    assert _structured(engine).grammars.num_compiled == len(set(chosen))  # once per schema
    _assert_drained(engine)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_schema_in_every_family(tiny_checkpoint: Any, family: str) -> None:
    _run_and_validate(_engine(tiny_checkpoint(family)), len(SCHEMAS), seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fifty_constrained_requests_per_family_all_parse_and_validate(
    tiny_checkpoint: Any, family: str
) -> None:
    """The issue's bar: 4 families x 50 = 200 requests over the schemas, 200/200 valid."""
    _run_and_validate(_engine(tiny_checkpoint(family)), 50, seed=len(family))


@pytest.mark.parametrize("family", ["qwen2", "internlm2"])
def test_unconstrained_neighbours_keep_their_tokens(tiny_checkpoint: Any, family: str) -> None:
    path = tiny_checkpoint(family)
    engine = _engine(path)
    prompts = _prompts(engine, 8, seed=3)
    plain = [
        SamplingParams(max_tokens=24, ignore_eos=True, temperature=t, seed=i)
        for i, t in enumerate([0.0, 1.0, 0.0, 0.7])
    ]
    alone = engine.generate(prompts[:4], plain)
    mixed = engine.generate(prompts, [*plain, *(_params("receipt", i) for i in range(4))])
    assert [o.token_ids for o in mixed[:4]] == [o.token_ids for o in alone]
    for out in mixed[4:]:
        _assert_valid(out.text, SCHEMAS["receipt"])


def test_json_object_gives_an_object(tiny_qwen2: Path) -> None:
    """Any object: random weights may ramble inside it, so only the prefix rules are checked on
    long ones; a short one must parse."""
    engine = _engine(tiny_qwen2)
    spec = StructuredOutput(type="json_object")
    params = [
        SamplingParams(max_tokens=200, structured_output=spec, temperature=1.0, seed=s)
        for s in range(8)
    ]
    done = engine.generate(_prompts(engine, 8), params)
    for out in done:
        assert out.text.startswith("{")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
    assert any(out.finish_reason == "stop" for out in done)


def test_preemption_keeps_matchers_in_step(tiny_llama: Path) -> None:
    """A KV pool too small for the batch forces recompute preemption: same greedy outputs."""
    names = ["enums", "nested", "arrays", "person"] * 2
    roomy = _engine(tiny_llama)
    prompts = _prompts(roomy, len(names), seed=5)
    params = [_params(n, 0, max_tokens=160) for n in names]  # greedy
    reference = roomy.generate(prompts, params)
    tight = _engine(tiny_llama, num_kv_blocks=60, max_num_batched_tokens=64)
    done = tight.generate(prompts, params)
    assert tight.stats.num_preemptions > 0
    assert [o.token_ids for o in done] == [o.token_ids for o in reference]
    for name, out in zip(names, done, strict=True):
        _assert_valid(out.text, SCHEMAS[name])
    _assert_drained(tight)


def test_pipeline_parallel_last_stage_holds_the_matchers(tiny_checkpoint: Any) -> None:
    path = tiny_checkpoint("internlm2", num_llm_layers=3)
    engine = _engine(path, pp_size=2)
    names = list(SCHEMAS)
    done = engine.generate(_prompts(engine, len(names)), [_params(n, 1) for n in names])
    for name, out in zip(names, done, strict=True):
        _assert_valid(out.text, SCHEMAS[name])
    assert engine.pipeline.stages[0].runner.structured.num_active == 0  # type: ignore[attr-defined]


def test_abort_and_finish_free_the_matchers(tiny_qwen2: Path) -> None:
    engine = _engine(tiny_qwen2)
    prompts = _prompts(engine, 2)
    engine.add_request("a", prompts[0], _params("receipt", 1))
    engine.add_request("b", prompts[1], _params("person", 0))
    engine.step()
    engine.step()
    assert _structured(engine).num_active == 2
    engine.abort("a")
    while engine.has_unfinished():
        engine.step()
    engine.add_request("c", prompts[0], SamplingParams(max_tokens=1))
    engine.step()  # the next batch carries the finished ids to the last stage
    assert _structured(engine).num_active == 0
    _assert_drained(engine)


def test_ignore_eos_runs_on_with_stop_tokens_only(tiny_phi3: Path) -> None:
    engine = _engine(tiny_phi3)
    params = _params("person", 0, ignore_eos=True).model_copy(update={"max_tokens": 80})
    (out,) = engine.generate(_prompts(engine, 1), params)
    assert out.finish_reason == "length" and len(out.token_ids) == 80
    _assert_valid(out.text, SCHEMAS["person"])  # trailing stop tokens are special: no text
    stop = engine.eos_token_ids[0]
    first_stop = out.token_ids.index(stop)
    assert set(out.token_ids[first_stop:]) == {stop}


def test_uncompilable_schema_and_min_tokens_are_refused_before_any_work(tiny_qwen2: Path) -> None:
    engine = _engine(tiny_qwen2)
    bad = StructuredOutput(
        type="json_schema", json_schema={"type": "integer", "minimum": 5, "maximum": 1}
    )
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("x", [1, 2, 3], SamplingParams(structured_output=bad))
    assert info.value.param == "response_format" and info.value.status_code == 400
    with pytest.raises(InvalidRequestError, match="min_tokens") as info:
        engine.add_request("y", [1, 2, 3], _params("person", 0, min_tokens=3))
    assert info.value.param == "response_format"
    assert not engine.has_unfinished()
    assert _structured(engine).num_active == 0
