"""Request schema errors name the field as it sits in the user's JSON (no pydantic union labels)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from internvl_core.errors import RequestSchemaError
from internvl_core.protocol import ChatCompletionRequest
from internvl_core.validation import schema_error


def _user(content: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


def _image(**image_url: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": "data:x", **image_url}}


CASES = [
    # An extension field one level too high: the part, not `content.str`, is the mistake.
    (_user([{**_image(), "max_dynamic_patch": 100}]), "messages[0].content[0].max_dynamic_patch"),
    (_user([_image(detail="huge")]), "messages[0].content[0].image_url.detail"),
    (_user([_image(max_dynamic_patch=100)]), "messages[0].content[0].image_url.max_dynamic_patch"),
    (_user([{"type": "image_url"}]), "messages[0].content[0].image_url"),
    (_user([{"type": "audio"}]), "messages[0].content[0]"),
    (_user(5), "messages[0].content"),
    ({**_user("hi"), "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    (
        _user([{"type": "video_url", "video_url": {"url": "x", "bound": [1]}}]),
        "messages[0].content[0].video_url.bound[1]",
    ),
]


@pytest.mark.parametrize(("body", "param"), CASES)
def test_schema_error_names_the_field_in_the_body(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    error = schema_error(caught.value, body)
    assert isinstance(error, RequestSchemaError) and error.status_code == 422
    assert error.param == param
    assert error.message.startswith(f"{param}: ")
