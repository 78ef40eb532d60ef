"""Prompt text equals the original conversation.py + chat() strings (spec section 3)."""

from __future__ import annotations

import pytest

from internvl_core.preprocess.prompt import (
    DEFAULT_SYSTEM_MESSAGE,
    build_query,
    expand_image_placeholders,
    get_template,
    multi_image_prefix,
    video_prefix,
)

SYS = DEFAULT_SYSTEM_MESSAGE


def test_hermes_single_image_prompt() -> None:
    template = get_template("Hermes-2")
    query = build_query(template, "<image>\nWhat is it?")
    query = expand_image_placeholders(query, [2], num_image_token=3)
    ctx = "<IMG_CONTEXT>" * 6
    assert query == (
        f"<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n<img>{ctx}</img>\nWhat is it?"
        "<|im_end|><|im_start|>assistant\n"
    )


def test_internlm2_same_as_hermes() -> None:
    a = build_query(get_template("Hermes-2"), "hi")
    b = build_query(get_template("internlm2-chat"), "hi")
    assert a == b


def test_phi3_prompt_and_stop_token() -> None:
    template = get_template("phi3-chat")
    query = build_query(template, "hi", system_message="S")
    assert query == "<|system|>\nS<|end|><|user|>\nhi<|end|><|assistant|>\n"
    assert template.stop_token == "<|end|>"


def test_second_round_appends_history() -> None:
    template = get_template("Hermes-2")
    query = build_query(template, "q2", history=[("q1", "a1")], system_message="")
    assert query == (
        "<|im_start|>system\n<|im_end|><|im_start|>user\nq1<|im_end|>"
        "<|im_start|>assistant\na1<|im_end|><|im_start|>user\nq2<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_empty_answer_in_history_leaves_only_role() -> None:
    # The original's `if message:` treats "" like None.
    template = get_template("Hermes-2")
    query = build_query(template, "q2", history=[("q1", "")], system_message="s")
    assert "<|im_start|>assistant\n<|im_start|>user\nq2" in query


def test_first_remaining_placeholder_first_and_leftovers_stay() -> None:
    text = "A <image> B <image> C <image>"
    out = expand_image_placeholders(text, [1, 2], num_image_token=1)
    assert out == ("A <img><IMG_CONTEXT></img> B <img><IMG_CONTEXT><IMG_CONTEXT></img> C <image>")


def test_prefixes() -> None:
    assert multi_image_prefix(1) == "<image>\n"
    assert multi_image_prefix(2) == "Image-1: <image>\nImage-2: <image>\n"
    assert video_prefix(3) == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\n"


def test_unknown_template() -> None:
    with pytest.raises(ValueError, match="unknown"):
        get_template("vicuna")
