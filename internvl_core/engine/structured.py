"""Structured outputs on the last stage: one xgrammar GrammarMatcher per constrained request.

In: a step's logits [N, V] and its SamplingRequests (rows with `params.structured_output` are
constrained). Out: those rows masked in place to the tokens the grammar allows; after sampling,
each matcher advances by its row's token. Rows without a grammar are never touched.
"""

# follows the bitmask protocol of https://xgrammar.mlc.ai/docs/ (fill rows, apply in place)

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import xgrammar as xgr

from internvl_core.engine.batch import SamplingRequest
from internvl_core.errors import InternVLError
from internvl_core.grammar import GrammarCache, tokenizer_info
from internvl_core.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Constraint:
    """One request's matcher; `num_accepted` counts the tokens it has taken (for rollback)."""

    matcher: xgr.GrammarMatcher
    stop_token_ids: tuple[int, ...]
    num_accepted: int = 0


class StructuredOutputs:
    """Matchers by request id, living where the tokens are sampled (the last stage).

    The sampled token of a step is known here at once, so the matcher is current for the next
    step even when the host reads tokens back later. Recompute preemption keeps every output
    token, so matchers survive it; a host that discards sampled tokens calls `rollback`.
    """

    def __init__(
        self,
        tokenizer: Callable[[], Tokenizer] | None,
        *,
        vocab_size: int,
        max_cached_grammars: int = 128,
    ) -> None:
        """`tokenizer` is called on the first constrained request (most stages never need one;
        None: constrained requests fail); `vocab_size` is the model head's width, which may
        exceed the tokenizer's vocabulary."""
        self._load_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_cached_grammars = max_cached_grammars
        self._cache: GrammarCache | None = None
        self._constraints: dict[str, _Constraint] = {}
        self._bitmask = xgr.allocate_token_bitmask(0, vocab_size)  # [rows, ceil(V / 32)] int32

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, vocab_size: int) -> StructuredOutputs:
        return cls(lambda: load_tokenizer(path), vocab_size=vocab_size)

    @property
    def num_active(self) -> int:
        return len(self._constraints)

    @property
    def grammars(self) -> GrammarCache:
        """The compiled-grammar cache (built with the tokenizer on first use)."""
        if self._cache is None:
            if self._load_tokenizer is None:
                raise InternVLError(
                    "a response_format request reached a stage built without a tokenizer "
                    "(ModelRunner(structured=StructuredOutputs.from_checkpoint(...)))"
                )
            info = tokenizer_info(self._load_tokenizer(), vocab_size=self.vocab_size)
            self._cache = GrammarCache(info, max_entries=self.max_cached_grammars)
        return self._cache

    def apply_constraints(self, logits: torch.Tensor, requests: Sequence[SamplingRequest]) -> None:
        """Mask, in place, the rows of `logits` [N, V] whose request has a grammar.

        Costs one attribute check per row when no request of the step is constrained.
        """
        rows = [i for i, req in enumerate(requests) if req.params.structured_output is not None]
        if not rows:
            return
        assert logits.shape == (len(requests), self.vocab_size), "one row per request, full head"
        if self._bitmask.shape[0] < len(requests):
            self._bitmask = xgr.allocate_token_bitmask(len(requests), self.vocab_size)
        bitmask = self._bitmask[: len(requests)]  # [N, ceil(V / 32)] int32
        for row in rows:
            self._fill(self._constraint(requests[row]), bitmask, row)
        xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=rows
        )

    def advance(self, requests: Sequence[SamplingRequest], token_ids: Sequence[int]) -> None:
        """Feed each constrained row's sampled token to its matcher."""
        assert len(requests) == len(token_ids), "one sampled token per request"
        if not self._constraints:
            return  # no grammar alive: nothing to advance
        for req, token in zip(requests, token_ids, strict=True):
            constraint = self._constraints.get(req.request_id)
            if constraint is None or constraint.matcher.is_terminated():
                continue  # unconstrained, or only stop tokens remain (ignore_eos runs on)
            if constraint.matcher.accept_token(token):
                constraint.num_accepted += 1
            else:
                # Only reachable if a row's mask was overridden downstream; the output may
                # no longer follow the grammar, so say so loudly.
                logger.error("request %s: grammar rejected sampled token %d", req.request_id, token)

    def rollback(self, request_id: str, num_tokens: int) -> None:
        """Undo the last `num_tokens` tokens of a request (the host discarded them)."""
        constraint = self._constraints.get(request_id)
        if constraint is None or num_tokens <= 0:
            return
        assert num_tokens <= constraint.num_accepted, "cannot roll back past the first token"
        constraint.matcher.rollback(num_tokens)
        constraint.num_accepted -= num_tokens

    def free(self, request_ids: Iterable[str]) -> None:
        """Drop the matchers of finished or aborted requests."""
        for request_id in request_ids:
            self._constraints.pop(request_id, None)

    def _constraint(self, req: SamplingRequest) -> _Constraint:
        constraint = self._constraints.get(req.request_id)
        if constraint is None:
            spec = req.params.structured_output
            assert spec is not None
            stops = list(req.eos_token_ids)
            matcher = xgr.GrammarMatcher(
                self.grammars.get(spec), override_stop_tokens=stops or None
            )
            constraint = _Constraint(matcher, tuple(matcher.stop_token_ids))
            self._constraints[req.request_id] = constraint
        return constraint

    def _fill(self, constraint: _Constraint, bitmask: torch.Tensor, row: int) -> None:
        if not constraint.matcher.is_terminated():
            constraint.matcher.fill_next_token_bitmask(bitmask, row)
            return
        # The grammar ended and its stop token was taken, yet the request runs on (ignore_eos):
        # nothing but stop tokens may follow.
        words: dict[int, int] = {}
        for token in constraint.stop_token_ids:
            words[token // 32] = words.get(token // 32, 0) | 1 << (token % 32)
        bitmask[row] = 0
        for index, word in words.items():
            bitmask[row, index] = word - (1 << 32) if word >= 1 << 31 else word  # as int32
