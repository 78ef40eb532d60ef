"""RequestPreparer: prompt ids equal the offline chat's, media limits refuse with named knobs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams
from internvl_core.errors import (
    ContextLengthError,
    InvalidRequestError,
    MediaError,
    PayloadTooLargeError,
)
from internvl_core.preprocess.image import TilingConfig, load_image
from internvl_core.preprocess.prompt import build_query, expand_image_placeholders, get_template
from internvl_core.preprocess.request import PreparedRequest, RequestPreparer
from internvl_core.protocol import ChatCompletionRequest
from internvl_core.serve_args import MediaLimits
from internvl_core.tokenizer import load_tokenizer


def _png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _preparer(path: Path, **limits: object) -> RequestPreparer:
    arch = ModelArchitecture.from_checkpoint(path)
    return RequestPreparer(
        arch,
        load_tokenizer(path),
        MediaLimits.model_validate(limits),
        EngineConfig(max_model_len=2048),
        SamplingParams(max_tokens=32),
    )


def _prepare(preparer: RequestPreparer, body: dict) -> PreparedRequest:
    request = ChatCompletionRequest.model_validate({"model": "m", **body})
    return asyncio.run(preparer.prepare(request, "req-1"))


def _user(*parts: dict) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}]}


def _image_part(data: bytes, **extra: object) -> dict:
    return {"type": "image_url", "image_url": {"url": _data_url(data), **extra}}


def test_one_image_prompt_equals_offline_chat(tiny_qwen2: Path) -> None:
    preparer = _preparer(tiny_qwen2)
    png = _png(120, 60)
    prepared = _prepare(preparer, _user(_image_part(png), {"type": "text", "text": "Describe."}))
    arch = preparer.arch
    pixels = load_image(io.BytesIO(png), TilingConfig.from_architecture(arch))
    np.testing.assert_array_equal(prepared.images[0].pixel_values, pixels)
    tiles = prepared.images[0].tiles  # what travels to the vision pool: raw RGB bytes
    assert tiles.dtype == np.uint8 and tiles.shape == (len(pixels), *pixels.shape[2:], 3)
    query = build_query(get_template(arch.template), "<image>\nDescribe.")
    query = expand_image_placeholders(query, [len(pixels)], arch.num_image_token)
    assert prepared.prompt_token_ids == load_tokenizer(tiny_qwen2).encode(query)
    assert prepared.num_image_tokens == len(pixels) * arch.num_image_token
    assert prepared.sampling.max_tokens == 32


def test_detail_low_and_per_image_max(tiny_qwen2: Path) -> None:
    preparer = _preparer(tiny_qwen2)
    png = _png(400, 100)
    prepared = _prepare(
        preparer,
        _user(_image_part(png, detail="low"), _image_part(png, max_dynamic_patch=2)),
    )
    assert [image.num_tiles for image in prepared.images] == [1, 3]  # 2 tiles + thumbnail


def test_limits_name_their_knob(tiny_qwen2: Path) -> None:
    png = _png(200, 200)
    with pytest.raises(InvalidRequestError, match="max_images_per_request is 1"):
        _prepare(
            _preparer(tiny_qwen2, max_images_per_request=1),
            _user(_image_part(png), _image_part(png)),
        )
    with pytest.raises(InvalidRequestError, match="max_tiles_per_request is 2"):
        _prepare(_preparer(tiny_qwen2, max_tiles_per_request=2), _user(_image_part(_png(900, 300))))
    with pytest.raises(PayloadTooLargeError, match="max_image_pixels"):
        _prepare(_preparer(tiny_qwen2, max_image_pixels=100), _user(_image_part(png)))
    with pytest.raises(MediaError, match="could not be decoded"):
        _prepare(_preparer(tiny_qwen2), _user(_image_part(b"PK\x03\x04 not a png")))


def test_context_length_refused_with_numbers(tiny_qwen2: Path) -> None:
    preparer = _preparer(tiny_qwen2)
    with pytest.raises(ContextLengthError, match="max_model_len 2048"):
        _prepare(preparer, {**_user({"type": "text", "text": "hi"}), "max_tokens": 4000})
    long_text = "word " * 3000
    with pytest.raises(ContextLengthError, match="prompt has"):
        _prepare(preparer, _user({"type": "text", "text": long_text}))


def test_default_max_tokens_clamped_to_fit(tiny_qwen2: Path) -> None:
    preparer = _preparer(tiny_qwen2)
    text = "word " * 300
    prepared = _prepare(preparer, _user({"type": "text", "text": text}))
    assert len(prepared.prompt_token_ids) + prepared.sampling.max_tokens <= 2048


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_alone_over_context_names_the_field(tiny_qwen2: Path, field: str) -> None:
    """No prompt fits next to it: the error names the field the client set, not the messages,
    and says nothing about images the request does not have."""
    with pytest.raises(ContextLengthError) as info:
        _prepare(_preparer(tiny_qwen2), {**_user({"type": "text", "text": "hi"}), field: 2048})
    assert info.value.param == field
    message = info.value.message
    assert f"{field} 2048 alone fills max_model_len 2048" in message
    assert "image" not in message and "max_dynamic_patch" not in message


def test_context_limit_capped_by_max_position_embeddings(tiny_qwen2: Path, tmp_path: Path) -> None:
    """max_model_len 2048 on a checkpoint trained for 512 positions: Preprocess refuses at 512,
    the limit the engine enforces."""
    checkpoint = tmp_path / "short"
    shutil.copytree(tiny_qwen2, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["llm_config"]["max_position_embeddings"] = 512
    (checkpoint / "config.json").write_text(json.dumps(config))
    preparer = _preparer(checkpoint)
    assert preparer.max_model_len == 512
    with pytest.raises(ContextLengthError, match="max_model_len 512") as info:
        _prepare(preparer, {**_user({"type": "text", "text": "hi"}), "max_tokens": 600})
    assert info.value.param == "max_tokens"
    prepared = _prepare(preparer, _user({"type": "text", "text": "hi"}))
    assert len(prepared.prompt_token_ids) + prepared.sampling.max_tokens <= 512
