"""Property test of the request path: random JSON bodies through `ChatCompletionRequest` parsing
and `RequestPreparer.prepare` end only in success, a pydantic ValidationError or an InternVLError
with status 400/404/413; never another exception, never a hang. Outcome counts are logged.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams
from internvl_core.errors import InternVLError
from internvl_core.preprocess.request import PreparedRequest, RequestPreparer
from internvl_core.protocol import ChatCompletionRequest
from internvl_core.serve_args import MediaLimits
from internvl_core.tokenizer import load_tokenizer
from tests import media_factory as mf

logger = logging.getLogger(__name__)

NUM_EXAMPLES = 3000
MAX_MODEL_LEN = 1024
PREPARE_TIMEOUT_S = 10.0  # a hang, not slowness: typical examples take milliseconds
ALLOWED_STATUS = (400, 404, 413)
INT64_MAX = 2**63 - 1

# ---- strategies ---------------------------------------------------------------------------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
_json_value = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_numbers = st.one_of(
    st.integers(min_value=-5, max_value=50),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(min_value=-3.0, max_value=3.0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 1e308, -0.0]),
)


@functools.cache
def _static_urls() -> list[str]:
    """Fixed media URLs (valid, refused and malformed); built when the strategy first draws."""
    return [
        mf.data_url(mf.png_bytes(1, 1)),
        mf.data_url(mf.png_bytes(60, 20, seed=2)),
        mf.data_url(mf.png_bytes(56, 56, seed=3)),
        mf.data_url(mf.png_bytes(300, 40, seed=4)),  # over max_image_pixels below: 413
        mf.data_url(mf.jpeg_bytes(40, 70)),
        mf.data_url(mf.gif_animation([(9, 9, 9), (200, 0, 0)]), "image/gif"),
        mf.data_url(mf.solid_image(16, 16, (1, 2, 3), fmt="ICO")),
        mf.data_url(mf.truncated(mf.png_bytes(60, 60))),
        mf.data_url(mf.zip_bytes()),
        mf.data_url(mf.png_bomb(30000, 30000, complete=False)),
        "data:image/png;base64,",
        "data:image/png;base64,@@@",
        "data:image/png;base64",
        "data:,hello",
        "http://10.0.0.1/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.png",
        "http://127.0.0.1:9/a.png",
        "ftp://example.com/a.png",
        "file:///etc/passwd",
        "/etc/passwd",
        "",
    ]


def _weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Pick a strategy with probability proportional to its weight (one_of is near-uniform)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda k: table[k])


def _mostly(valid: st.SearchStrategy[Any], chaos: st.SearchStrategy[Any]) -> Any:
    """`valid` five times in six, else `chaos` (so most bodies reach the preparer)."""
    return _weighted((5, valid), (1, chaos))


_valid_image_url = st.sampled_from(range(6)).map(lambda k: _static_urls()[k])
_urls = _weighted(
    (3, _valid_image_url),
    (1, st.builds(_static_urls).flatmap(st.sampled_from)),
    (1, st.binary(max_size=48).map(mf.data_url)),
    (1, st.text(max_size=30) | st.text(max_size=30).map(lambda t: "data:image/png;base64," + t)),
)


@functools.cache
def _clip() -> str:
    return mf.data_url(mf.mp4_clip(12, width=32, height=32), "video/mp4")


def _with_extras(base: st.SearchStrategy[dict[str, Any]], **optional: Any) -> Any:
    """`base` plus any subset of `optional` fields, now and then an unknown field."""
    extras = st.fixed_dictionaries({}, optional=optional)
    unknown = st.dictionaries(st.sampled_from(["extra", "urls", "Detail"]), _json_leaf, max_size=1)
    unknown = _mostly(st.just({}), unknown)
    return st.tuples(base, extras, unknown).map(lambda t: {**t[0], **t[1], **t[2]})


_image_url = _with_extras(
    st.fixed_dictionaries({"url": _urls}),
    detail=_mostly(st.sampled_from(["auto", "low", "high"]), st.sampled_from(["ultra", 3])),
    max_dynamic_patch=_mostly(st.integers(1, 6), _numbers),
)
_video_url = _with_extras(
    st.fixed_dictionaries({"url": _mostly(st.builds(_clip), _urls)}),
    num_segments=_mostly(st.integers(1, 5), _numbers),
    bound=_mostly(
        st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 2.0)), st.tuples(_numbers, _numbers)
    ),
    max_dynamic_patch=_mostly(st.integers(1, 3), _numbers),
)
_text = st.text(max_size=40) | st.sampled_from(["<image>", "Frame1: <image>\n", "<img>", "</img>"])
_valid_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": _image_url}),
)
_part = _weighted(
    (12, _valid_part),
    (1, st.fixed_dictionaries({"type": st.just("video_url"), "video_url": _video_url})),
    (1, st.fixed_dictionaries({"type": st.sampled_from(["audio", "text", "image_url"])})),
    (1, _json_value),
)
_content = _mostly(_text | st.lists(_part, max_size=3), st.none() | _json_value)
_role = _mostly(st.sampled_from(["user", "assistant", "system"]), st.sampled_from(["tool", ""]))
_message = _with_extras(
    st.fixed_dictionaries({"role": _role, "content": _content}),
    name=_mostly(st.text(max_size=5), _json_leaf),
)
_system = st.fixed_dictionaries({"role": st.just("system"), "content": _text})
_turn = st.tuples(
    st.fixed_dictionaries({"role": st.just("user"), "content": _content}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": _text}),
)
_user_last = st.fixed_dictionaries(
    {"role": st.just("user"), "content": st.lists(_part, min_size=1, max_size=3) | _text}
)
_conversation = st.tuples(
    st.lists(_system, max_size=1), st.lists(_turn, max_size=2), _user_last
).map(lambda t: [*t[0], *(m for pair in t[1] for m in pair), t[2]])
_messages = _mostly(_conversation, st.lists(_message, max_size=5) | _json_value)
_in_range: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.floats(0.0, 2.0),
    "top_p": st.floats(0.01, 1.0),
    "top_k": st.integers(0, 50),
    "min_p": st.floats(0.0, 1.0),
    "max_tokens": st.integers(1, 2 * MAX_MODEL_LEN),
    "max_completion_tokens": st.integers(1, 2 * MAX_MODEL_LEN),
    "min_tokens": st.integers(0, 8),
    "seed": st.integers(0, 2**32) | st.sampled_from([2**63, 10**30, -(2**64)]),
    "n": st.integers(1, 8),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "repetition_penalty": st.floats(0.1, 2.0),
    "max_dynamic_patch": st.integers(1, 12),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4),
    "stream": st.booleans(),
    "user": st.text(max_size=8),
}


def _field_values(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {name: _mostly(_in_range[name], _numbers | _json_leaf) for name in names}
    )


_fields = st.lists(st.sampled_from(sorted(_in_range)), max_size=4, unique=True).flatmap(
    _field_values
)
_body = _mostly(
    st.tuples(
        st.fixed_dictionaries({"model": st.just("tiny"), "messages": _messages}), _fields
    ).map(lambda t: {**t[0], **t[1]}),
    _with_extras(st.fixed_dictionaries({"messages": _messages}), model=_json_leaf) | _json_value,
)
# (body, how it is sent): the python dict, its JSON text, or that text cut short.
_payload = st.tuples(
    _body, st.sampled_from(["python", "json", "json", "json", "json", "cut"]), st.integers(0, 400)
)


# ---- the test -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preparer(tiny_qwen2: Path) -> Iterator[tuple[RequestPreparer, asyncio.AbstractEventLoop]]:
    """One preparer on one long-lived loop, like a Preprocess replica serving many requests."""
    limits = MediaLimits(
        max_images_per_request=6,
        max_image_pixels=10_000,
        max_tiles_per_request=24,
        max_num_segments=4,
        fetch_timeout_s=1.0,
    )
    prep = RequestPreparer(
        ModelArchitecture.from_checkpoint(tiny_qwen2),
        load_tokenizer(tiny_qwen2),
        limits,
        EngineConfig(max_model_len=MAX_MODEL_LEN),
        SamplingParams(max_tokens=64),
    )
    loop = asyncio.new_event_loop()
    yield prep, loop
    loop.run_until_complete(prep.fetcher.close())
    loop.close()


def _nan_bound_body() -> dict[str, Any]:
    """A real clip with a NaN/inf bound: JSON-valid for pydantic, fatal to frame indexing."""
    video = {"type": "video_url", "video_url": {"url": _clip(), "bound": [math.nan, math.inf]}}
    return {"model": "m", "messages": [{"role": "user", "content": [video]}]}


def _parse(body: Any, mode: str, cut: int) -> ChatCompletionRequest:
    if mode == "python":
        return ChatCompletionRequest.model_validate(body)
    text = json.dumps(body, allow_nan=True)
    return ChatCompletionRequest.model_validate_json(text[:cut] if mode == "cut" else text)


def _check_success(prepared: PreparedRequest, prep: RequestPreparer) -> str:
    """Invariants of a prepared request; the outcome name (seed notes a downstream hazard)."""
    vocab = len(prep.tokenizer)
    assert prepared.prompt_token_ids and all(0 <= t < vocab for t in prepared.prompt_token_ids)
    prompt_len = len(prepared.prompt_token_ids)
    assert 1 <= prepared.sampling.max_tokens <= MAX_MODEL_LEN - prompt_len
    assert prepared.num_image_tokens == prepared.num_tiles * prep.arch.num_image_token
    context_id = prep.tokenizer.token_to_id("<IMG_CONTEXT>")
    assert prepared.prompt_token_ids.count(context_id) == prepared.num_image_tokens
    size = prep.arch.force_image_size
    for image in prepared.images:
        assert image.pixel_values.shape[1:] == (3, size, size)
        assert bool(image.pixel_values.size) and math.isfinite(float(image.pixel_values.sum()))
    seed = prepared.sampling.seed
    if seed is not None and not -INT64_MAX - 1 <= seed <= INT64_MAX:
        return "ok_seed_outside_int64"
    return "ok_with_media" if prepared.images else "ok_text_only"


def _outcome(payload: tuple[Any, str, int], prep: RequestPreparer, loop: Any) -> str:
    body, mode, cut = payload
    try:
        request = _parse(body, mode, cut)
    except ValidationError:
        return "validation_error"
    coro = asyncio.wait_for(prep.prepare(request, "prop"), timeout=PREPARE_TIMEOUT_S)
    try:
        prepared = loop.run_until_complete(coro)
    except InternVLError as e:
        assert e.status_code in ALLOWED_STATUS, f"{type(e).__name__} has status {e.status_code}"
        assert e.message, "refusal without a message"
        return type(e).__name__
    except ValidationError:
        return "validation_error_in_prepare"
    return _check_success(prepared, prep)


@pytest.mark.slow  # 3000 examples: about 10-20 s on 2 shared cores
def test_random_requests_end_in_allowed_outcomes(
    preparer: tuple[RequestPreparer, asyncio.AbstractEventLoop],
) -> None:
    prep, loop = preparer
    counts: Counter[str] = Counter()
    start = time.perf_counter()

    @settings(
        max_examples=NUM_EXAMPLES,
        deadline=3000,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payload=_payload)
    @example(payload=(_nan_bound_body(), "python", 0))
    @example(
        payload=(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 10**30},
            "json",
            0,
        )
    )
    @example(
        payload=(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**30},
            "json",
            0,
        )
    )
    def check(payload: tuple[Any, str, int]) -> None:
        counts[_outcome(payload, prep, loop)] += 1

    check()
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    logger.info("%d examples in %.1f s: %s", total, elapsed, dict(sorted(counts.items())))
    assert total >= 1000
    assert counts["validation_error"] > 0
    assert counts["ok_text_only"] + counts["ok_with_media"] > 0
    assert counts["MediaError"] > 0 and counts["InvalidRequestError"] > 0
    # The preparer is still healthy: no task of any example is left on its loop.
    assert not [task for task in asyncio.all_tasks(loop) if not task.done()]
