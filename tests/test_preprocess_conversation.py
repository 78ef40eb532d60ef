"""OpenAI messages -> (system, history, question, media) with the original demo's prompt rules."""

from __future__ import annotations

import pytest

from internvl_core.errors import InvalidRequestError
from internvl_core.preprocess.conversation import plan_conversation
from internvl_core.protocol import ChatMessage


def _msgs(*raw: dict) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in raw]


def _img(url: str = "data:x", **extra: object) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def test_text_only() -> None:
    plan = plan_conversation(_msgs({"role": "user", "content": "hi"}))
    assert (plan.system_message, plan.history, plan.question, plan.media) == (None, [], "hi", [])


def test_one_image_prefix() -> None:
    content = [_img(), {"type": "text", "text": "What?"}]
    plan = plan_conversation(_msgs({"role": "user", "content": content}))
    assert plan.question == "<image>\nWhat?"
    assert [m.kind for m in plan.media] == ["image"]


def test_two_images_prefix_and_tile_overrides() -> None:
    content = [
        _img("a", max_dynamic_patch=3),
        _img("b", detail="low"),
        {"type": "text", "text": "Q"},
    ]
    plan = plan_conversation(_msgs({"role": "user", "content": content}), max_dynamic_patch=6)
    assert plan.question == "Image-1: <image>\nImage-2: <image>\nQ"
    assert [(m.url, m.max_tiles, m.detail) for m in plan.media] == [
        ("a", 3, "auto"),
        ("b", 6, "low"),
    ]


def test_existing_placeholders_used_as_is_and_mismatch_refused() -> None:
    content = [_img(), {"type": "text", "text": "look <image> here"}]
    plan = plan_conversation(_msgs({"role": "user", "content": content}))
    assert plan.question == "look <image> here"
    bad = [_img(), _img(), {"type": "text", "text": "one <image>"}]
    with pytest.raises(InvalidRequestError, match="1 <image> placeholders but its media need 2"):
        plan_conversation(_msgs({"role": "user", "content": bad}))


def test_video_frames_prefix() -> None:
    content = [
        {"type": "video_url", "video_url": {"url": "v", "num_segments": 2}},
        {"type": "text", "text": "What happens?"},
    ]
    plan = plan_conversation(_msgs({"role": "user", "content": content}))
    assert plan.question == "Frame1: <image>\nFrame2: <image>\nWhat happens?"
    assert plan.media[0].num_placeholders == 2


def test_history_keeps_image_in_its_turn_and_system_replaces() -> None:
    plan = plan_conversation(
        _msgs(
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [_img(), {"type": "text", "text": "q1"}]},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
        )
    )
    assert plan.system_message == "Be brief."
    assert plan.history == [("<image>\nq1", "a1")]
    assert plan.question == "q2"
    assert len(plan.media) == 1


@pytest.mark.parametrize(
    "raw",
    [
        ({"role": "assistant", "content": "x"},),
        ({"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}),
        ({"role": "user", "content": "x"}, {"role": "system", "content": "s"}),
    ],
)
def test_malformed_turns(raw: tuple[dict, ...]) -> None:
    with pytest.raises(InvalidRequestError):
        plan_conversation(_msgs(*raw))
