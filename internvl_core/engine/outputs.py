"""What the engine hands back: per-step `RequestOutput`, whole-request `CompletedOutput`, stats.

Plain slotted dataclasses; the Serve LLM deployment turns them into OpenAI chunks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestOutput:
    """One request's progress in one engine step."""

    request_id: str
    text_delta: str  # complete UTF-8 text new this step (held back near a possible stop string)
    token_ids: list[int]  # tokens new this step (the stop token included, as the original)
    logprobs: list[float] | None  # per new token, if params.logprobs
    top_logprobs: list[list[tuple[int, float]]] | None  # per new token, if params.top_logprobs
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort", "error"
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    queue_time_s: float | None = None  # arrival to first scheduled; None until scheduled


@dataclass(slots=True)
class CompletedOutput:
    """A finished request, as `LLMEngine.generate` returns it."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class EngineStats:
    """Queue depths and KV pool occupancy of one replica."""

    num_waiting: int
    num_running: int
    num_in_flight_batches: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_block_size: int
    prefix_cache_hit_rate: float  # over the replica's lifetime
    num_preemptions: int
    # Cumulative prompt tokens looked up in / served by the prefix cache; a reader takes the
    # difference of two readings for a recent hit rate.
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use."""
        return 1.0 - self.kv_blocks_free / self.kv_blocks_total if self.kv_blocks_total else 0.0


class OutputCollector:
    """Accumulates one request's step outputs into a CompletedOutput."""

    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []

    def add(self, out: RequestOutput) -> None:
        self.outputs.append(out)

    def complete(self, request_id: str) -> CompletedOutput:
        last = self.outputs[-1]
        logprobs = [lp for o in self.outputs for lp in (o.logprobs or [])]
        top = [t for o in self.outputs for t in (o.top_logprobs or [])]
        return CompletedOutput(
            request_id=request_id,
            token_ids=[t for o in self.outputs for t in o.token_ids],
            text="".join(o.text_delta for o in self.outputs),
            finish_reason=last.finish_reason,
            num_prompt_tokens=last.num_prompt_tokens,
            num_cached_tokens=last.num_cached_tokens,
            logprobs=logprobs or None,
            top_logprobs=top or None,
            stop_reason=last.stop_reason,
        )
