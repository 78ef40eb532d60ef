"""Incremental detokenization: output token ids, one at a time -> complete UTF-8 text deltas.

The deltas of one sequence concatenate to `tokenizer.decode(output_ids, skip_special_tokens=...)`,
the text the original `batch_decode(new_ids)` produces; each step decodes only a short window.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Protocol

logger = logging.getLogger(__name__)

# What a decoder emits for bytes that are not (yet) valid UTF-8.
REPLACEMENT_CHAR = "\ufffd"
# Sentencepiece byte-fallback pieces. transformers' fast ByteFallback decoder turns a whole run of
# them into U+FFFDs when the run is not valid UTF-8, so a later byte token can rewrite the text of
# earlier ones ("<0x67>" = "g" alone, "\ufffd\ufffd" followed by "<0xE4>"): runs are held back.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TokenDecoder(Protocol):
    """The part of the project's `Tokenizer` (internvl_core/tokenizer/loader.py) used here."""

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]: ...


class IncrementalDetokenizer:
    """Per-sequence text state; `append` returns the new complete text, `flush` the held rest.

    Window technique: `prefix_offset:read_offset` are tokens whose text was already returned and
    serve as context; each step decodes `ids[prefix_offset:]` and returns what follows the
    context's own decode. Text ending in U+FFFD (a multi-byte character split over byte tokens) is
    held back until a later token completes it; so is a run of byte-fallback tokens, until a
    token that adds visible text ends it. `flush()` releases the rest when the sequence ends.
    The window only moves past tokens that produced text, so a leading space is never stripped
    because the context happened to be all skipped special tokens.
    """

    # follows https://github.com/vllm-project/vllm/blob/v0.6.0/vllm/transformers_utils/detokenizer.py
    # (detokenize_incrementally), decoding id windows with `decode` instead of token strings.

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool,
    ) -> None:
        """`prompt_token_ids` are not decoded as context: the original decodes the new ids alone
        (`batch_decode(output_ids)`), so the first token's text is exactly what it gives there."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        self._text = ""
        # A byte-fallback run is open; `_held_window` is the window's decode at the last hold.
        self._byte_run_open = False
        self._held_window = ""

    @property
    def text(self) -> str:
        """All text returned so far (the concatenation of the deltas)."""
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids

    @property
    def has_pending(self) -> bool:
        """Whether tokens are held back (an incomplete character at the end)."""
        return self._read_offset < len(self._ids)

    def append(self, token_id: int) -> str:
        """Add one output token; return its complete text delta ("" while held back)."""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix_offset :])
        if self._is_byte_token(token_id):
            self._byte_run_open = True
            return self._hold(window)
        if window.endswith(REPLACEMENT_CHAR):
            return self._hold(window)
        if self._byte_run_open and window == self._held_window:
            # A token without visible text (a skipped special) does not end a byte run.
            return self._hold(window)
        self._byte_run_open = False
        return self._emit(window)

    def flush(self) -> str:
        """Release held-back text at the end of the sequence (invalid bytes stay as U+FFFD)."""
        if not self.has_pending:
            return ""
        self._byte_run_open = False
        return self._emit(self._decode(self._ids[self._prefix_offset :]))

    def _hold(self, window: str) -> str:
        self._held_window = window
        return ""

    def _is_byte_token(self, token_id: int) -> bool:
        token = self._tokenizer.convert_ids_to_tokens([token_id])[0]
        return token is not None and _BYTE_TOKEN.fullmatch(token) is not None

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _emit(self, window: str) -> str:
        """Return the text of `window` past the context and slide the window."""
        if window.startswith(self._prefix_text):
            delta = window[len(self._prefix_text) :]
        else:
            delta = self._delta_from_full_decode()
        previous_read = self._read_offset
        self._read_offset = len(self._ids)
        if not delta:
            # No visible text (e.g. skipped special tokens): keep the context where it is.
            self._prefix_text = window
            return ""
        self._prefix_offset = previous_read
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        self._text += delta
        return delta

    def _delta_from_full_decode(self) -> str:
        """Slow path for a tokenizer whose window decode is not prefix-stable here."""
        full = self._decode(self._ids)
        if full.startswith(self._text):
            return full[len(self._text) :]
        logger.debug("decode changed already returned text; returning only the new tail")
        return full[len(self._text) :] if len(full) > len(self._text) else ""
