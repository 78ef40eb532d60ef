"""Stream wire format: choice assembly, grounding boxes, usage, embeddings on the wire."""

from __future__ import annotations

import torch

from deployments.events import (
    ChoiceAccumulator,
    EmbeddingPayload,
    GenerationEvent,
    running_usage,
    unwrap_error,
)
from deployments.llm import merge_events
from internvl_core.errors import MediaError
from internvl_core.protocol import StreamOptions


def test_choice_with_grounding_boxes_and_usage() -> None:
    acc = ChoiceAccumulator(0)
    acc.add(GenerationEvent(text="A <ref>cat</ref>", num_prompt_tokens=10, num_output_tokens=3))
    acc.add(
        GenerationEvent(
            text="<box>[[1, 2, 3, 4]]</box>",
            finish_reason="stop",
            num_prompt_tokens=10,
            num_output_tokens=7,
        )
    )
    choice = acc.choice()
    assert choice.message.content == "A <ref>cat</ref><box>[[1, 2, 3, 4]]</box>"
    assert choice.message.boxes is not None
    assert [(b.ref, b.box) for b in choice.message.boxes] == [("cat", [1, 2, 3, 4])]
    assert choice.finish_reason == "stop"
    other = ChoiceAccumulator(1)
    other.add(GenerationEvent(text="x", num_prompt_tokens=10, num_output_tokens=2))
    usage = ChoiceAccumulator.usage([acc, other])
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 9, 19)


def test_empty_event_makes_no_chunk() -> None:
    acc = ChoiceAccumulator(0)
    assert acc.chunk_choice(GenerationEvent()) is None
    chunk = acc.chunk_choice(GenerationEvent(text="hi"))
    assert chunk is not None and chunk.delta.content == "hi"


def test_merge_events_concatenates_steps() -> None:
    events = [
        GenerationEvent(text="a", token_ids=[1], num_output_tokens=1),
        GenerationEvent(text="b", token_ids=[2], num_output_tokens=2, finish_reason="length"),
    ]
    merged = merge_events(events)
    assert (merged.text, merged.token_ids, merged.finish_reason) == ("ab", [1, 2], "length")
    assert merged.num_output_tokens == 2 and merged.logprobs is None


def test_embedding_payload_roundtrip_bf16_and_fp32() -> None:
    for dtype in (torch.bfloat16, torch.float32):
        rows = torch.randn(5, 8).to(dtype)
        back = EmbeddingPayload.from_tensor(rows).to_tensor()
        assert back.dtype == dtype and torch.equal(back, rows)


def test_unwrap_error_walks_causes() -> None:
    inner = MediaError("bad")

    class Wrapper(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("wrapped")
            self.cause = cause

    assert unwrap_error(Wrapper(Wrapper(inner))) is inner


def test_running_usage_only_with_include_usage_and_continuous_stats() -> None:
    first = [GenerationEvent(text="a", num_prompt_tokens=9, num_output_tokens=1)] * 2
    accs = [ChoiceAccumulator(0), ChoiceAccumulator(1)]
    both = StreamOptions(include_usage=True, continuous_usage_stats=True)
    assert running_usage(both, accs, first) == {
        "prompt_tokens": 9,  # known from the first events before any is added
        "completion_tokens": 0,
        "total_tokens": 9,
    }
    accs[0].add(GenerationEvent(text="a", num_prompt_tokens=9, num_output_tokens=3))
    accs[1].add(GenerationEvent(text="b", num_prompt_tokens=9, num_output_tokens=2))
    assert running_usage(both, accs, first) == {
        "prompt_tokens": 9,
        "completion_tokens": 5,  # summed over the choices, as the final usage
        "total_tokens": 14,
    }
    for options in (
        None,
        StreamOptions(include_usage=True),
        StreamOptions(continuous_usage_stats=True),
    ):
        assert running_usage(options, accs, first) is None  # vLLM needs both flags
