"""Stop rules: output ids + detokenized text -> finish ("stop" at eos / stop id / stop string, or
"length" at max_tokens), plus the original `chat()` response post-processing. The step loop's
token-level part runs over a whole batch at once (`TokenStops`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from internvl_core.config import SamplingParams
from internvl_core.engine.sequence import SequenceStatus

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class StopDecision:
    """Why a sequence ends; `truncate_text_to` cuts the text (the stop string or the stop
    token's own text is not returned, or ends the text with include_stop_str_in_output).
    None keeps the whole text."""

    finish_reason: FinishReason
    stop_reason: int | str | None = None
    truncate_text_to: int | None = None


class StopChecker:
    """Per-sequence stop state; call `check` once after every appended output token."""

    def __init__(self, params: SamplingParams, *, eos_token_ids: tuple[int, ...]) -> None:
        """`eos_token_ids`: the template separator id (`<|im_end|>` / `<|end|>`), the original's
        only stop id; ignored when `params.ignore_eos`. `params.stop_token_ids` always stop."""
        self._params = params
        eos = () if params.ignore_eos else eos_token_ids
        self._stop_ids = frozenset((*params.stop_token_ids, *eos))
        self._stop_strings = tuple(s for s in params.stop if s)
        self._checked_len = 0  # text length seen by the previous `check`

    def check(self, output_token_ids: list[int], text: str) -> StopDecision | None:
        """Decide after the newest token. `text` is the sequence's detokenized text so far; only
        its tail (new delta + the longest stop string) is searched, so stop strings may span
        tokens. Nothing stops before `min_tokens` outputs except `max_tokens`."""
        num_outputs = len(output_token_ids)
        previous_len = min(self._checked_len, len(text))
        self._checked_len = len(text)
        if num_outputs == 0:
            return None
        min_tokens = self._params.min_tokens
        # As the sampler's mask (HF min_new_tokens): a stop id counts only after min_tokens
        # other outputs; a stop string once min_tokens outputs exist (vLLM).
        last_id = output_token_ids[-1]
        if num_outputs > min_tokens and last_id in self._stop_ids:
            # The stop token's own text (e.g. "<|im_end|>" when specials are kept) is cut,
            # unless the request asks to keep it (vLLM's include_stop_str_in_output).
            keep = self._params.include_stop_str_in_output
            cut = previous_len if len(text) > previous_len and not keep else None
            return StopDecision(finish_reason="stop", stop_reason=last_id, truncate_text_to=cut)
        if num_outputs >= min_tokens:
            decision = self._find_stop_string(text, previous_len)
            if decision is not None:
                return decision
        if num_outputs >= self._params.max_tokens:
            return StopDecision(finish_reason="length")
        return None

    def _find_stop_string(self, text: str, previous_len: int) -> StopDecision | None:
        """Earliest stop string that ends in the new text (it may start in older text)."""
        best: tuple[int, str] | None = None
        for stop in self._stop_strings:
            start = max(0, previous_len - len(stop) + 1)
            index = text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        end = best[0] + len(best[1]) if self._params.include_stop_str_in_output else best[0]
        return StopDecision(finish_reason="stop", stop_reason=best[1], truncate_text_to=end)

    def safe_text_len(self, text: str) -> int:
        """Length of the prefix of `text` that can be streamed: a tail that could still grow into
        a stop string is held back, so a client never sees part of a stop string. Nothing is
        held when stop strings are returned (include_stop_str_in_output): a partial match is
        text the client gets either way."""
        if self._params.include_stop_str_in_output:
            return len(text)
        hold = 0
        for stop in self._stop_strings:
            for size in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:size]):
                    hold = size
                    break
        return len(text) - hold


class TokenStops:
    """The step loop's stop rules, one numpy row per live request: a stop id (after min_tokens
    outputs) ends it with "stop", max_tokens with "length". `finished` checks a whole batch with
    a few array ops; stop strings stay with `StopChecker` on the output side."""

    def __init__(self, capacity: int = 64) -> None:
        self._max_tokens = np.zeros(capacity, dtype=np.int64)  # [rows]
        self._min_tokens = np.zeros(capacity, dtype=np.int64)  # [rows]
        self._stop_ids = np.full((capacity, 1), -1, dtype=np.int64)  # [rows, max_stop_ids]
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def num_live(self) -> int:
        return len(self._max_tokens) - len(self._free)

    def add(self, params: SamplingParams, *, eos_token_ids: tuple[int, ...]) -> int:
        """A row for a new request (as `StopChecker`: eos ids unless ignore_eos); its index."""
        ids = (*params.stop_token_ids, *(() if params.ignore_eos else eos_token_ids))
        if not self._free:
            self._grow(rows=2 * len(self._max_tokens), width=self._stop_ids.shape[1])
        if len(ids) > self._stop_ids.shape[1]:
            self._grow(rows=len(self._max_tokens), width=len(ids))
        row = self._free.pop()
        self._max_tokens[row] = params.max_tokens
        self._min_tokens[row] = params.min_tokens
        self._stop_ids[row] = -1  # token ids are never negative
        self._stop_ids[row, : len(ids)] = ids
        return row

    def free(self, row: int) -> None:
        self._free.append(row)

    def finished(
        self, rows: np.ndarray, last_ids: np.ndarray, num_outputs: np.ndarray
    ) -> list[tuple[int, SequenceStatus]]:
        """(batch index, status) of the requests that end at their newest token.

        Args:
            rows: [N] each request's row; last_ids: [N] its newest output id;
            num_outputs: [N] its output count including that id.
        """
        stopped = (self._stop_ids[rows] == last_ids[:, None]).any(axis=1)  # [N]
        stopped &= num_outputs > self._min_tokens[rows]
        ended = np.flatnonzero(stopped | (num_outputs >= self._max_tokens[rows]))  # [num_ended]
        stop, length = SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH
        return [(i, stop if stopped[i] else length) for i in ended.tolist()]

    def _grow(self, *, rows: int, width: int) -> None:
        old_rows, old_width = self._stop_ids.shape
        stop_ids = np.full((rows, width), -1, dtype=np.int64)  # [rows, width]
        stop_ids[:old_rows, :old_width] = self._stop_ids
        self._stop_ids = stop_ids
        self._max_tokens = np.resize(self._max_tokens, rows)  # [rows]
        self._min_tokens = np.resize(self._min_tokens, rows)  # [rows]
        self._free.extend(range(rows - 1, old_rows - 1, -1))


def finalize_chat_response(text: str, sep: str) -> str:
    """The original `chat()` post-processing: `text.split(sep)[0].strip()`."""
    return text.split(sep, 1)[0].strip()
