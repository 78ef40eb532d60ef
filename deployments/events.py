"""The LLM replica's stream wire format and how the ingress assembles choices from it.

In: plain dicts yielded by `LLMDeployment.generate` (cheap to serialise). Out: OpenAI choices,
chunks and usage (final, or on every chunk with continuous_usage_stats); plus `unwrap_error` to
see our exception through Ray's wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from internvl_core.grounding import parse_boxes
from internvl_core.preprocess.request import PreparedRequest
from internvl_core.protocol import (
    AssistantMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    GroundingBox,
    StreamOptions,
    TokenLogprob,
    Usage,
)


def unwrap_error(exc: BaseException) -> BaseException:
    """Ray wraps a replica's exception (RayTaskError(cause)); return the innermost cause."""
    seen = 0
    while seen < 8 and getattr(exc, "cause", None) is not None:
        exc = exc.cause  # type: ignore[attr-defined]
        seen += 1
    return exc


@dataclass(slots=True)
class GenerationEvent:
    """One step of one choice: the text delta and counters; `finish_reason` on the last."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[dict[str, Any]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_wire(self) -> dict[str, Any]:
        # Shallow: the lists are this event's own and go straight to serialisation
        # (`dataclasses.asdict` deep-copies them, once per streamed event).
        return {name: getattr(self, name) for name in _EVENT_FIELDS}

    @classmethod
    def from_wire(cls, raw: dict[str, Any] | GenerationEvent) -> GenerationEvent:
        return raw if isinstance(raw, GenerationEvent) else cls(**raw)


_EVENT_FIELDS = tuple(f.name for f in fields(GenerationEvent))


class ChoiceAccumulator:
    """Collects the events of one choice into the final message / streamed chunks, and when its
    first token and its last event arrived (for TTFT and TPOT)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.parts: list[str] = []
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        self.wants_logprobs = False
        self.first_token_at: float | None = None
        self.last_at: float | None = None

    def add(self, event: GenerationEvent, at: float | None = None) -> None:
        """Add one event; `at` is its arrival time (`time.perf_counter`), if timed."""
        if at is not None:
            self.last_at = at
            if self.first_token_at is None and event.token_ids:
                self.first_token_at = at
        self.parts.append(event.text)
        if event.logprobs is not None:
            self.wants_logprobs = True
            self.logprobs.extend(event.logprobs)
        self.finish_reason = event.finish_reason or self.finish_reason
        self.num_prompt_tokens = max(self.num_prompt_tokens, event.num_prompt_tokens)
        self.num_output_tokens = max(self.num_output_tokens, event.num_output_tokens)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def _logprobs(self, items: list[dict[str, Any]]) -> ChoiceLogprobs | None:
        if not self.wants_logprobs:
            return None
        return ChoiceLogprobs(content=[TokenLogprob.model_validate(i) for i in items])

    def choice(self) -> Choice:
        text = self.text
        boxes = [GroundingBox.model_validate(b) for b in parse_boxes(text)] or None
        return Choice(
            index=self.index,
            message=AssistantMessage(content=text, boxes=boxes),
            finish_reason=self.finish_reason,
            logprobs=self._logprobs(self.logprobs),
        )

    def chunk_choice(self, event: GenerationEvent) -> ChunkChoice | None:
        """The chunk for one event, or None when it carries nothing a client can see."""
        if not event.text and event.finish_reason is None and not event.logprobs:
            return None
        return ChunkChoice(
            index=self.index,
            delta=Delta(content=event.text or None),
            finish_reason=event.finish_reason,
            logprobs=self._logprobs(event.logprobs or []) if event.logprobs else None,
        )

    @staticmethod
    def usage(accs: list[ChoiceAccumulator]) -> Usage:
        prompt = max((a.num_prompt_tokens for a in accs), default=0)
        completion = sum(a.num_output_tokens for a in accs)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


def running_usage(
    options: StreamOptions | None,
    accs: list[ChoiceAccumulator],
    first: list[GenerationEvent],
) -> dict[str, int] | None:
    """Usage so far, for every chunk, when the client asks for vLLM's `continuous_usage_stats`
    (with `include_usage`, as vLLM requires); None otherwise. `first`: each choice's first
    event (the role chunks go out before any event is added, the prompt counted already)."""
    if options is None or not (options.include_usage and options.continuous_usage_stats):
        return None
    usage = ChoiceAccumulator.usage(accs)
    prompt = max([usage.prompt_tokens, *(event.num_prompt_tokens for event in first)])
    completion = usage.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@dataclass(slots=True)
class EmbeddingPayload:
    """Image embeddings on the wire: numpy has no bfloat16, so bf16 travels as its int16 bits
    (zero-copy through the object store) and is viewed back on arrival."""

    data: Any  # np.ndarray [num_image_tokens, D_llm]
    dtype: str

    @classmethod
    def from_tensor(cls, rows: torch.Tensor) -> EmbeddingPayload:
        rows = rows.detach().cpu().contiguous()
        if rows.dtype == torch.bfloat16:
            return cls(rows.view(torch.int16).numpy(), "bfloat16")
        return cls(rows.numpy(), str(rows.dtype).removeprefix("torch."))

    def to_tensor(self) -> torch.Tensor:
        tensor = torch.from_numpy(np.array(self.data))  # writable copy of the read-only array
        if self.dtype == "bfloat16":
            return tensor.view(torch.bfloat16)
        return tensor


@dataclass(slots=True)
class EncodedRequest:
    """A media request as the vision pool hands it to the LLM replica: the prepared request
    without its pixel arrays (tile counts and content hashes kept) and the image embeddings.
    The LLM's node never fetches pixels it has no use for."""

    prepared: PreparedRequest
    embeds: EmbeddingPayload | None

    @classmethod
    def of(cls, prepared: PreparedRequest, embeds: EmbeddingPayload | None) -> EncodedRequest:
        images = [
            replace(image, tiles=image.tiles[:, :0])  # [T, 0, S, 3]: no bytes
            for image in prepared.images
        ]
        return cls(replace(prepared, images=images), embeds)
