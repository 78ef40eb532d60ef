"""Incremental detokenization: output token ids, one at a time -> complete UTF-8 text deltas.

The deltas of one sequence concatenate to `tokenizer.decode(output_ids, skip_special_tokens=...)`,
the text the original `batch_decode(new_ids)` produces; each step decodes only a short window.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# What a decoder emits for bytes that are not (yet) valid UTF-8.
REPLACEMENT_CHAR = "\ufffd"
# Sentencepiece byte-fallback pieces. transformers' fast ByteFallback decoder turns a whole run of
# them into U+FFFDs when the run is not valid UTF-8, so a later byte token can rewrite the text of
# earlier ones ("<0x67>" alone is "g"; followed by "<0xE4>" both become U+FFFD): runs are held.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# transformers' `clean_up_tokenization` (always on in the original InternLM2 decode) deletes the
# space in these patterns, so a tail that may still grow into one of them is held back.
_CLEANUP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
# Tokens of context kept before the newest ones; the window slides once it is twice as long.
_CONTEXT_TOKENS = 4


class TokenDecoder(Protocol):
    """The part of the project's `Tokenizer` (internvl_core/tokenizer/loader.py) used here."""

    def decode(
        self,
        ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str: ...

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]: ...


# Every proper prefix of a clean-up pattern: a text tail equal to one may still become a pattern.
_CLEANUP_PREFIXES = frozenset(p[:size] for p in _CLEANUP_PATTERNS for size in range(1, len(p)))
_MAX_CLEANUP_PREFIX = max(len(p) for p in _CLEANUP_PATTERNS) - 1
# Per tokenizer: token id -> whether it is a byte-fallback piece (asked once per id, not per step).
_BYTE_TOKEN_IDS: weakref.WeakKeyDictionary[Any, dict[int, bool]] = weakref.WeakKeyDictionary()


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):  # the common case: the window only grew
        return len(a)
    size = min(len(a), len(b))
    for i in range(size):
        if a[i] != b[i]:
            return i
    return size


def _unstable_suffix_len(text: str) -> int:
    """Longest tail of `text` that is a proper prefix of a clean-up pattern."""
    for size in range(min(len(text), _MAX_CLEANUP_PREFIX), 0, -1):
        if text[-size:] in _CLEANUP_PREFIXES:
            return size
    return 0


class IncrementalDetokenizer:
    """Per-sequence text state: `append` returns the newly complete text, `flush` the rest.

    Each step decodes the window `ids[window_start:]` (a few context tokens + the new one) and
    compares it with the window's previous decode: appended characters are new text, and a
    decoder that rewrites the window's tail (U+FFFD completed into a character, a byte-fallback
    run turned invalid, a clean-up that deletes a space) is followed exactly as long as the
    rewritten characters were not returned yet. A tail that may still change is held back: trailing
    U+FFFD, an open byte-fallback run, a prefix of a clean-up pattern. `flush()` returns it when
    the sequence ends (invalid bytes then stay U+FFFD, as in `decode`). The window slides only
    over stable text and only to a context whose own decode matches, so start-of-text effects
    (a stripped leading space, skipped special tokens) never leak into the deltas.

    Known gap: with `skip_special_tokens=False`, the slow InternLM2 / Llama decode puts a space
    before the whole run of text that precedes a `<s>`/`</s>`/`<unk>` piece; a streamed delta
    cannot insert it retroactively (`skip_special_tokens=True`, the original's setting, is exact).
    """

    # follows https://github.com/vllm-project/vllm/blob/v0.6.0/vllm/transformers_utils/detokenizer.py
    # (detokenize_incrementally: decode a short window, return what the new token added).

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        """`prompt_token_ids` are not decoded as context: the original decodes the new ids alone
        (`batch_decode(output_ids)`), so the first token's text is exactly what it gives there.
        `spaces_between_special_tokens` is passed on only when off: on is every decoder's own
        behaviour (and fast tokenizers ignore the flag, as in transformers)."""
        self._tokenizer = tokenizer
        self._decode_options: dict[str, bool] = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:
            self._decode_options["spaces_between_special_tokens"] = False
        self.num_prompt_tokens = len(prompt_token_ids)
        self._ids: list[int] = []
        self._window_start = 0
        self._window_text = ""  # decode(ids[window_start:]) after the last step
        self._text = ""  # returned so far
        self._pending = ""  # decoded, not returned yet: may still change
        self._byte_run_start: int | None = None  # text position where an open byte run began
        try:
            self._byte_ids = _BYTE_TOKEN_IDS.setdefault(tokenizer, {})
        except TypeError:  # a tokenizer without weak references: cache per sequence only
            self._byte_ids = {}

    @property
    def text(self) -> str:
        """All text returned so far (the concatenation of the deltas)."""
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids

    @property
    def has_pending(self) -> bool:
        """Whether decoded text is held back (it may still change)."""
        return bool(self._pending)

    def append(self, token_id: int) -> str:
        """Add one output token; return the text that became final ("" while held back)."""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._window_start :])
        old_window = self._window_text
        changed_from = self._absorb(window)
        if self._is_byte_token(token_id):
            start = self._byte_run_start
            self._byte_run_start = changed_from if start is None else min(start, changed_from)
        elif window != old_window:
            self._byte_run_start = None  # visible text ends the run; skipped specials do not
        delta = self._release(final=False)
        self._slide_window()
        return delta

    def flush(self) -> str:
        """Return the held-back text at the end of the sequence."""
        self._byte_run_start = None
        return self._release(final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, **self._decode_options)

    def _is_byte_token(self, token_id: int) -> bool:
        known = self._byte_ids.get(token_id)
        if known is None:
            token = self._tokenizer.convert_ids_to_tokens([token_id])[0]
            known = token is not None and _BYTE_TOKEN.fullmatch(token) is not None
            self._byte_ids[token_id] = known
        return known

    def _absorb(self, window: str) -> int:
        """Fold the new window decode into the pending text; return the text position from
        which characters are new or rewritten."""
        old = self._window_text
        keep = _common_prefix_len(old, window)
        rewritten = len(old) - keep
        self._window_text = window
        if rewritten > len(self._pending):
            return self._resync()
        self._pending = self._pending[: len(self._pending) - rewritten] + window[keep:]
        return len(self._text) + len(self._pending) - (len(window) - keep)

    def _resync(self) -> int:
        """Slow path: the decoder changed text already returned; decode everything once."""
        full = self._decode(self._ids)
        if not full.startswith(self._text):
            logger.warning("decode rewrote text already streamed; continuing after it")
        self._pending = full[len(self._text) :]
        self._window_start = max(0, len(self._ids) - _CONTEXT_TOKENS)
        self._window_text = self._decode(self._ids[self._window_start :])
        return len(self._text)

    def _release(self, *, final: bool) -> str:
        pending = self._pending
        hold = 0
        if not final:
            hold = len(pending) - len(pending.rstrip(REPLACEMENT_CHAR))
            hold = max(hold, _unstable_suffix_len(pending))
            if self._byte_run_start is not None:
                hold = max(hold, len(self._text) + len(pending) - self._byte_run_start)
        delta = pending[: max(0, len(pending) - hold)]
        self._pending = pending[len(delta) :]
        self._text += delta
        return delta

    def _slide_window(self) -> None:
        """Drop old context once the window is long, if all of it is returned and stable."""
        start = len(self._ids) - _CONTEXT_TOKENS
        if start - self._window_start < _CONTEXT_TOKENS or self._pending:
            return
        if self._byte_run_start is not None:
            return
        context = self._decode(self._ids[start:])
        if context and self._window_text.endswith(context):
            self._window_start = start
            self._window_text = context
