"""The output side of the engine: new token ids -> detokenized, stop-checked RequestOutputs.

The step loop only appends token ids and frees requests that end by a stop id or by length (a
token-level check); the text (incremental detokenization) and stop strings are handled here, after
the next step has been submitted, so they overlap the device. A stop string found here ends its
request through `finish` (as vLLM V1's output processor aborts the request in the engine core).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from internvl_core.engine.detokenizer import IncrementalDetokenizer
from internvl_core.engine.outputs import RequestOutput
from internvl_core.engine.sequence import Sequence, SequenceStatus
from internvl_core.engine.stop import StopChecker

_Logprobs = tuple[list[float] | None, list[list[tuple[int, float]]] | None]
# Tokens between GIL yields (each costs ~70 us: timer slack): ~0.6 ms of detokenization and stops.
YIELD_EVERY = 64


@dataclass(slots=True)
class RequestState:
    """What the output side keeps per live request."""

    seq: Sequence
    stop: StopChecker
    detokenizer: IncrementalDetokenizer | None
    num_emitted_chars: int = 0


@dataclass(slots=True)
class StepTokens:
    """The step loop's new tokens (read back one step behind the device): `seqs[i]` received
    `token_ids[i]`; per-sequence logprobs only when some request asked."""

    seqs: list[Sequence] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[float] | None] | None = None
    top_logprobs: list[list[list[tuple[int, float]]] | None] | None = None


class OutputProcessor:
    """Turns StepTokens into RequestOutputs; drops finished requests from `states`."""

    def __init__(
        self,
        states: dict[str, RequestState],
        finish: Callable[[Sequence, SequenceStatus], None],
    ) -> None:
        """`states` is shared with the engine; `finish(seq, status)` frees a request's blocks."""
        self.states = states
        self._finish = finish

    def process(self, step: StepTokens) -> list[RequestOutput]:
        """One RequestOutput per new token, in the step's order.

        Pure Python that never releases the GIL by itself: every YIELD_EVERY tokens it lets the
        process's other Python threads run (`time.sleep(0)`, a few us), so that a big batch
        does not hold them back for the interpreter's switch interval (5 ms): the replica's
        event loop, and stage or device threads woken by the batch that just came back.
        """
        num = len(step.seqs)
        if num <= YIELD_EVERY:
            return self._process_rows(step, 0, num)
        outputs: list[RequestOutput] = []
        for start in range(0, num, YIELD_EVERY):
            time.sleep(0)  # yields the GIL to threads waiting for it
            outputs.extend(self._process_rows(step, start, start + YIELD_EVERY))
        return outputs

    def _process_rows(self, step: StepTokens, start: int, end: int) -> list[RequestOutput]:
        states, advance = self.states, self._advance
        seqs, token_ids = step.seqs[start:end], step.token_ids[start:end]
        if step.logprobs is None and step.top_logprobs is None:
            return [
                advance(states[seq.request.request_id], token, None)
                for seq, token in zip(seqs, token_ids, strict=True)
            ]
        logprobs = step.logprobs[start:end] if step.logprobs else [None] * len(seqs)
        top = step.top_logprobs[start:end] if step.top_logprobs else [None] * len(seqs)
        return [
            advance(
                states[seq.request.request_id],
                token,
                (lp, tp) if lp is not None or tp is not None else None,
            )
            for seq, token, lp, tp in zip(seqs, token_ids, logprobs, top, strict=True)
        ]

    def _advance(
        self, state: RequestState, token: int, logprobs: _Logprobs | None
    ) -> RequestOutput:
        """Detokenize one new token, apply stop rules, emit the safe text delta."""
        seq, detok = state.seq, state.detokenizer
        if detok is not None:
            detok.append(token)
        text = detok.text if detok is not None else ""
        decision = state.stop.check(seq.output_token_ids, text)
        if decision is None:
            visible = state.stop.safe_text_len(text) if detok is not None else 0
            delta = text[state.num_emitted_chars : visible]
            state.num_emitted_chars = max(state.num_emitted_chars, visible)
            return make_output(state, [token], delta, logprobs)
        if detok is not None and decision.truncate_text_to is None:
            detok.flush()  # the sequence ends: release a held incomplete character
            text = detok.text
        end = decision.truncate_text_to if decision.truncate_text_to is not None else len(text)
        delta = text[state.num_emitted_chars : end]
        # Already finished by the step loop unless a stop string ended it here.
        self._finish(seq, SequenceStatus.from_finish_reason(decision.finish_reason))
        self.states.pop(seq.request_id, None)
        return make_output(
            state, [token], delta, logprobs, reason=decision.finish_reason,
            stop_reason=decision.stop_reason,
        )  # fmt: skip


def make_output(
    state: RequestState,
    token_ids: list[int],
    delta: str,
    logprobs: _Logprobs | None,
    *,
    reason: str | None = None,
    stop_reason: int | str | None = None,
) -> RequestOutput:
    seq = state.seq
    return RequestOutput(
        request_id=seq.request_id,
        text_delta=delta,
        token_ids=token_ids,
        logprobs=logprobs[0] if logprobs else None,
        top_logprobs=logprobs[1] if logprobs else None,
        finished=reason is not None,
        finish_reason=reason,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_output_tokens=seq.num_output_tokens,
        num_cached_tokens=seq.num_cached_tokens,
        stop_reason=stop_reason,
        queue_time_s=(
            None
            if seq.first_scheduled_time is None
            else seq.first_scheduled_time - seq.request.arrival_time
        ),
    )
