"""internvl_core.protocol: `response_format` in the request model and its mapping onto
SamplingParams (a file apart from test_protocol.py, which covers the other fields)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from internvl_core.config import SamplingParams, StructuredOutput
from internvl_core.protocol import ChatCompletionRequest

SCHEMA = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}}


def _request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def test_json_schema_maps_to_structured_output_keeping_property_order() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}
    params = _request(response_format=fmt).sampling(SamplingParams(temperature=0.5))
    assert params.temperature == 0.5
    assert params.structured_output == StructuredOutput(type="json_schema", json_schema=SCHEMA)
    assert params.structured_output.json_schema is not None
    assert params.structured_output.json_schema.index(
        '"z"'
    ) < params.structured_output.json_schema.index('"a"')


def test_json_object_text_and_absent() -> None:
    params = _request(response_format={"type": "json_object"}).sampling(SamplingParams())
    assert params.structured_output == StructuredOutput(type="json_object")
    assert (
        _request(response_format={"type": "text"}).sampling(SamplingParams()).structured_output
        is None
    )
    assert _request().sampling(SamplingParams()).structured_output is None


def test_yaml_default_grammar_is_overridden_by_the_request() -> None:
    default = SamplingParams.model_validate({"structured_output": {"type": "json_object"}})
    assert _request().sampling(default).structured_output == StructuredOutput(type="json_object")
    text = _request(response_format={"type": "text"}).sampling(default)
    assert text.structured_output is None


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema"},
        {"type": "json_object", "json_schema": {"name": "s", "schema": SCHEMA}},
        {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
        {"type": "json_schema", "json_schema": {"name": "s", "schema": [1]}},
        {"type": "xml"},
    ],
)
def test_malformed_response_format_is_refused(fmt: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        _request(response_format=fmt)
    assert info.value.errors()[0]["loc"][0] == "response_format"
