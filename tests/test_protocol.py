"""Tests for protocol.py: the request fields community clients send, and what is refused."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from internvl_core.config import SamplingParams
from internvl_core.protocol import ChatCompletionRequest

# What GuideLLM 0.8.1 sends for `--data kind=synthetic_text,...,output_tokens=32`.
GUIDELLM_BODY: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "hello"}],
    "stream": True,
    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    "max_tokens": 32,
    "max_completion_tokens": 32,
    "stop": None,
    "ignore_eos": True,
}


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_guidellm_request_parses_into_sampling() -> None:
    request = ChatCompletionRequest.model_validate(GUIDELLM_BODY)
    assert request.stream_options is not None and request.stream_options.continuous_usage_stats
    params = request.sampling(SamplingParams(max_tokens=512))
    assert params.ignore_eos and params.max_tokens == 32


def test_vllm_extensions_map_onto_sampling_params() -> None:
    request = ChatCompletionRequest.model_validate(
        _body(
            ignore_eos=True,
            stop_token_ids=[7, 9],
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            min_tokens=3,
            repetition_penalty=1.2,
            top_k=-1,
            min_p=0.1,
        )
    )
    params = request.sampling(SamplingParams())
    assert params.ignore_eos and params.stop_token_ids == (7, 9)
    assert params.include_stop_str_in_output and not params.skip_special_tokens
    assert not params.spaces_between_special_tokens
    assert (params.min_tokens, params.repetition_penalty, params.min_p) == (3, 1.2, 0.1)
    assert params.top_k == 0  # vLLM's -1 is "off", ours is 0


def test_unset_extensions_keep_the_server_defaults() -> None:
    defaults = SamplingParams(ignore_eos=True, skip_special_tokens=False, stop_token_ids=(5,))
    params = ChatCompletionRequest.model_validate(_body()).sampling(defaults)
    assert params == defaults


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
        ({"top_k": -2}, "top_k"),
        ({"ignore_eos": "maybe"}, "ignore_eos"),
        ({"guided_json": {"type": "object"}}, "guided_json"),  # unknown: refused, named
        ({"stream_options": {"include_usage": True, "per_token": True}}, "stream_options"),
    ],
)
def test_refusals_name_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(_body(**fields))
    assert info.value.errors()[0]["loc"][0] == param
