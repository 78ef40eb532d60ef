"""Test support: hypothesis strategies for chat request bodies as a client might send them.

Mostly valid OpenAI chat requests (text, image and video parts, sampling fields in range), with
fields out of range or of the wrong type, junk JSON, truncated bodies and hostile media mixed in.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import media_factory as mf

MODEL = "internvl2-tiny-media"
MAX_NEW = 4  # max_tokens drawn in range stay at or below this
METADATA = "http://169.254.169.254/latest/meta-data/"


def chat_body(*parts: dict[str, Any] | str, **fields: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def image(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


PLACEHOLDER_HOST = "http://media-host.invalid"  # the trusted media host, replaced when sent
_LEAF = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text()
_JUNK = st.recursive(_LEAF, lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(), x))
_CHAOS = _LEAF | st.sampled_from([-1, 0, 0.5, "3", 2**31, 2**63, 2**64, 10**30, 1e308, -1e308])
_TEXT = st.text(max_size=30) | st.sampled_from(["<image>", "<img>", "<IMG_CONTEXT>", "<ref>a"])
_OPTIONS = st.fixed_dictionaries({"include_usage": st.booleans()})
# fmt: off
_FIELDS: dict[str, st.SearchStrategy[Any]] = {  # in range; 10**6 tokens: context_length_exceeded
    "temperature": st.floats(0.0, 2.0), "top_p": st.floats(0.01, 1.0), "top_k": st.integers(0, 50),
    "max_tokens": st.integers(1, MAX_NEW) | st.just(10**6), "min_tokens": st.integers(0, MAX_NEW),
    "max_completion_tokens": st.integers(1, MAX_NEW), "seed": st.integers(0, 2**64 - 1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "n": st.integers(1, 4), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
    "presence_penalty": st.floats(-2.0, 2.0), "frequency_penalty": st.floats(-2.0, 2.0),
    "repetition_penalty": st.floats(0.5, 2.0), "max_dynamic_patch": st.integers(1, 6),
    "stream": st.booleans(), "stream_options": _OPTIONS,
}
# fmt: on


def _mostly(valid: Any, chaos: Any = _CHAOS, *, one_in: int = 6) -> Any:
    """`chaos` one time in `one_in`, else `valid` (the simplest draws stay valid)."""
    return st.integers(1, one_in).flatmap(lambda k: chaos if k == one_in else valid)


@functools.cache
def _urls() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(valid image URLs, refused ones: [2] is a PNG bomb); built when first drawn."""
    pngs = [mf.data_url(mf.png_bytes(w, h, seed=w)) for w, h in ((1, 1), (56, 56), (70, 30))]
    gif = mf.data_url(mf.gif_animation([(9, 9, 9), (200, 0, 0)]), "image/gif")
    valid = (
        *pngs,
        gif,
        mf.data_url(mf.jpeg_bytes(40, 70), "image/jpeg"),
        f"{PLACEHOLDER_HOST}/ok.png",
    )
    refused = (
        *(mf.data_url(mf.truncated(mf.png_bytes(60, 40, seed=1))), mf.data_url(mf.zip_bytes())),
        mf.data_url(mf.png_bomb(30000, 30000, complete=False)),
        *("data:image/png;base64,@@", "data:,", "", "ftp://example.com/x.png", METADATA),
        *("file:///etc/passwd", "http://10.0.0.1/x.png", f"{PLACEHOLDER_HOST}/big"),
    )
    return valid, refused


@functools.cache
def _clip_url() -> str:
    return mf.data_url(mf.mp4_clip(12, width=32, height=32), "video/mp4")


def _obj(required: dict[str, Any], **optional: st.SearchStrategy[Any]) -> Any:
    """A JSON object: the `required` keys and any subset of `optional` (1 in 6 out of range)."""
    return st.fixed_dictionaries(required, optional={k: _mostly(v) for k, v in optional.items()})


def _content() -> st.SearchStrategy[Any]:
    """A user turn's content: text, or up to 3 parts (text, image, video, malformed)."""
    valid, refused = _urls()
    garbage = st.binary(max_size=32).map(mf.data_url)
    url = st.integers(0, 9).flatmap(
        lambda k: st.sampled_from(valid) if k < 8 else st.sampled_from(refused) | garbage
    )
    detail = st.sampled_from(["auto", "low", "high"])
    picture = _obj({"url": url}, detail=detail, max_dynamic_patch=st.integers(1, 6))
    bound = st.tuples(st.floats(0, 2), st.floats(0, 2))
    clip = _mostly(st.builds(_clip_url), url)
    video = _obj({"url": clip}, num_segments=st.integers(1, 3), bound=bound)
    kinds = [
        _obj({"type": st.just("text"), "text": _TEXT}),
        _obj({"type": st.just("image_url"), "image_url": picture}),
        _obj({"type": st.just("video_url"), "video_url": video}),
        _obj({"type": st.sampled_from(["audio", "text", "image_url"])}) | _JUNK,
    ]
    part = st.integers(0, 15).flatmap(lambda k: kinds[(k > 6) + (k > 12) + (k > 13)])
    return _mostly(_TEXT | st.lists(part, max_size=3), st.none() | _JUNK, one_in=20)


def _messages() -> st.SearchStrategy[Any]:
    """Mostly [system?, (user, assistant)*, user]; else loose role/content lists or junk."""
    user = _obj({"role": st.just("user"), "content": _content()})
    system = _obj({"role": st.just("system"), "content": _TEXT})
    reply = _obj({"role": st.just("assistant"), "content": _TEXT})
    turns = st.tuples(st.lists(system, max_size=1), st.lists(st.tuples(user, reply), max_size=2))
    conversation = st.tuples(turns, user).map(
        lambda t: [*t[0][0], *(m for pair in t[0][1] for m in pair), t[1]]
    )
    role = _mostly(st.sampled_from(["user", "assistant", "system"]), st.sampled_from(["tool", ""]))
    loose = _obj({"role": role, "content": _content()})
    return _mostly(conversation, st.lists(loose, max_size=4) | _JUNK, one_in=10)


def request_bodies() -> st.SearchStrategy[bytes]:
    """Bodies as sent: mostly a chat request's JSON with fields in range (at times one out of
    range or of a wrong type); else a wrong model, JSON junk, JSON cut short or raw bytes."""
    fields = st.fixed_dictionaries({}, optional=_FIELDS).map(  # top_logprobs needs logprobs
        lambda f: {**f, "logprobs": True} if f.get("top_logprobs") else f
    )
    odd_field = st.dictionaries(st.sampled_from([*_FIELDS, "best_of"]), _CHAOS, max_size=1)
    model = _mostly(st.just(MODEL), _TEXT, one_in=20)
    head = st.fixed_dictionaries({"model": model, "messages": _messages()})
    chat = st.tuples(head, fields, _mostly(st.just({}), odd_field))
    body = _mostly(chat.map(lambda t: {**t[0], **t[1], **t[2]}), _JUNK, one_in=12)
    as_json = body.map(lambda b: json.dumps(b, allow_nan=True).encode())
    cut = st.tuples(as_json, st.integers(0, 200)).map(lambda t: t[0][: t[1]])
    return st.integers(0, 19).flatmap(lambda k: [cut, st.binary()][k] if k < 2 else as_json)


def tricky_bodies() -> list[bytes]:
    """Always sent too: reserved tokens typed by a user, NaN, the widest seed, 413s, extras."""
    picture, video = image(_urls()[0][1]), {"url": _clip_url(), "bound": [math.nan, 9]}
    bodies = [
        chat_body("<IMG_CONTEXT>"),
        chat_body(picture, "<IMG_CONTEXT><img></img>"),
        chat_body("x", temperature=math.nan, seed=2**64 - 1),
        chat_body("x", max_tokens=10**30),
        chat_body({"type": "video_url", "video_url": video}, "x"),
        chat_body(image(_urls()[1][2]), "x"),  # the PNG bomb: 413
        chat_body(image(f"{PLACEHOLDER_HOST}/big"), "x"),  # 413
        chat_body(picture, "x", n=4, logprobs=True, top_logprobs=5, stream=True, min_tokens=4,
                  stream_options={"include_usage": True}),
    ]  # fmt: skip
    return [json.dumps(body, allow_nan=True).encode() for body in bodies]


def collect_bodies(media_url: str, num_bodies: int) -> list[bytes]:
    """`num_bodies` bodies drawn by hypothesis, derandomized (the same list on every run)."""
    bodies: list[bytes] = []
    checks = list(HealthCheck)

    @settings(max_examples=num_bodies, derandomize=True, database=None, deadline=None,
              suppress_health_check=checks)  # fmt: skip
    @given(body=request_bodies())
    def collect(body: bytes) -> None:
        bodies.append(body)

    collect()
    host = media_url.encode()  # after drawing: the port must not change what is drawn
    return [body.replace(PLACEHOLDER_HOST.encode(), host) for body in bodies + tricky_bodies()]
