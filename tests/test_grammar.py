"""internvl_core.grammar: response_format specs -> xgrammar grammars, tokenizer infos for every
family (padded heads and special tokens masked), the bounded compiled-grammar cache, and the
400s for what xgrammar refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import xgrammar as xgr

from internvl_core.config import SamplingParams, StructuredOutput
from internvl_core.errors import InvalidRequestError
from internvl_core.grammar import (
    MAX_SCHEMA_CHARS,
    GrammarCache,
    build_grammar,
    check_structured_output,
    tokenizer_info,
)
from internvl_core.tokenizer import load_tokenizer

FAMILIES = {  # family -> (vocab type, template stop token)
    "qwen2": (xgr.VocabType.BYTE_LEVEL, "<|im_end|>"),
    "internlm2": (xgr.VocabType.BYTE_FALLBACK, "<|im_end|>"),
    "phi3": (xgr.VocabType.BYTE_LEVEL, "<|end|>"),
    "llama": (xgr.VocabType.BYTE_LEVEL, "<|im_end|>"),
}
PERSON = {
    "type": "object",
    "properties": {"name": {"enum": ["ann", "bob"]}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def _schema(schema: Any) -> StructuredOutput:
    return StructuredOutput(type="json_schema", json_schema=schema)


def _allowed(matcher: xgr.GrammarMatcher, vocab_size: int) -> set[int]:
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)]
    matcher.fill_next_token_bitmask(bitmask)
    logits = torch.zeros(1, vocab_size)  # [1, V]
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def test_spec_keeps_key_order_and_hashes_content() -> None:
    spec = _schema({"b": 1, "a": [1, 2]} | {"type": "object"})
    assert spec.json_schema == '{"b":1,"a":[1,2],"type":"object"}'
    assert spec.key == _schema(json.dumps({"b": 1, "a": [1, 2], "type": "object"})).key
    assert spec.key != _schema({"a": [1, 2], "b": 1, "type": "object"}).key
    with pytest.raises(ValueError, match="json_schema is required"):
        StructuredOutput(type="json_schema")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokenizer_info_per_family_with_a_padded_head(tiny_checkpoint: Any, family: str) -> None:
    """Model vocab 64 rows past the tokenizer: those ids and every special id are never
    allowed; the template stop token is allowed exactly where the JSON is complete."""
    tokenizer = load_tokenizer(tiny_checkpoint(family))
    vocab_type, stop_token = FAMILIES[family]
    stop = tokenizer.token_to_id(stop_token)
    assert stop is not None
    vocab_size = tokenizer.vocab_size + 64
    info = tokenizer_info(tokenizer, vocab_size=vocab_size, stop_token_ids=[stop])
    assert (info.vocab_type, info.vocab_size, info.stop_token_ids) == (
        vocab_type,
        vocab_size,
        [stop],
    )
    compiled = GrammarCache(info).get(_schema(PERSON))
    matcher = xgr.GrammarMatcher(compiled)
    first = _allowed(matcher, vocab_size)
    assert first and all(tokenizer.decode([t]).startswith("{") for t in first)
    assert not first & (
        set(tokenizer.all_special_ids) | set(range(tokenizer.vocab_size, vocab_size))
    )
    assert matcher.accept_string('{"name": "bob", "age": 7')
    allowed = _allowed(matcher, vocab_size)
    assert stop not in allowed and allowed  # digits or "}" next
    assert matcher.accept_string("}")
    assert _allowed(matcher, vocab_size) == {stop}
    assert matcher.accept_token(stop) and matcher.is_terminated()


def test_cache_compiles_once_and_is_bounded(tiny_qwen2: Path) -> None:
    tokenizer = load_tokenizer(tiny_qwen2)
    cache = GrammarCache(tokenizer_info(tokenizer, vocab_size=tokenizer.vocab_size), max_entries=2)
    specs = [_schema({"enum": [f"v{i}"]}) for i in range(3)]
    first = cache.get(specs[0])
    assert cache.get(_schema('{"enum": ["v0"]}')) is first and cache.num_compiled == 1
    cache.get(specs[1])
    cache.get(specs[0])  # most recent now
    cache.get(specs[2])  # evicts specs[1]
    assert len(cache) == 2 and cache.num_compiled == 3
    assert cache.get(specs[0]) is first
    cache.get(specs[1])
    assert cache.num_compiled == 4


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum greater than maximum"),
        ({"type": "string", "pattern": "(unclosed"}, "parenthesis is not closed"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "$defs"),
        ({"type": "wat"}, 'Unsupported type "wat"'),
        ([1, 2], "should be an object or bool"),
    ],
)
def test_uncompilable_schema_is_a_400_naming_response_format(schema: Any, reason: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_structured_output(SamplingParams(structured_output=_schema(schema)))
    error = info.value
    assert (error.status_code, error.param) == (400, "response_format")
    assert reason in error.message and "/project/cpp" not in error.message


def test_size_limit_min_tokens_and_plain_requests() -> None:
    huge = {"enum": ["x" * MAX_SCHEMA_CHARS]}
    with pytest.raises(InvalidRequestError, match="characters") as info:
        build_grammar(_schema(huge))
    assert info.value.param == "response_format"
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        check_structured_output(SamplingParams(min_tokens=2, structured_output=_schema(PERSON)))
    check_structured_output(SamplingParams(min_tokens=2))  # no grammar: nothing to check
    check_structured_output(SamplingParams(structured_output=StructuredOutput(type="json_object")))


def test_json_object_allows_any_object_but_only_an_object(tiny_qwen2: Path) -> None:
    tokenizer = load_tokenizer(tiny_qwen2)
    info = tokenizer_info(tokenizer, vocab_size=tokenizer.vocab_size)
    matcher = xgr.GrammarMatcher(GrammarCache(info).get(StructuredOutput(type="json_object")))
    assert matcher.accept_string('{"any": [1, {"k": null}], "b": "x"}')
    assert matcher.is_completed()
    other = xgr.GrammarMatcher(GrammarCache(info).get(StructuredOutput(type="json_object")))
    assert not other.accept_string("[1]")
