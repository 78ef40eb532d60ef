"""Sampler: last-stage logits [N, V] -> one token id per row (greedy or seeded), with logprobs.

Per row: min_tokens mask -> penalties -> greedy argmax, or temperature -> top_k -> top_p -> min_p
-> sample (exponential race with the row's own generator).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from internvl_core.config import SamplingParams

logger = logging.getLogger(__name__)

# Exponential noise of exactly 0 would turn -log(q) into +inf (and nan on masked tokens).
_MIN_NOISE = torch.finfo(torch.float32).tiny


@dataclass(slots=True)
class SamplingBatch:
    """Per-row inputs of one sampling step; row i belongs to one sequence.

    `stop_token_ids[i]` carries the row's eos ids (the template separator): with the row's
    `params.stop_token_ids` they are masked to -inf while fewer than `min_tokens` outputs exist
    (eos ids only when not `ignore_eos`). An empty list means "no eos ids for any row".
    """

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    stop_token_ids: list[tuple[int, ...]] = field(default_factory=list)


class SamplerOutput:
    """Chosen ids; logprobs are of the RAW model distribution (log_softmax of the logits before
    min_tokens masking, penalties and temperature), as OpenAI and vLLM report them by default.

    `logprobs` / `top_logprobs` are None unless some row asked; then every row is filled
    (`top_logprobs[i]` holds `params[i].top_logprobs` pairs, best first).

    The ids may stay on the device (`device_token_ids`, [N] int64) until `token_ids` is first
    read: the read-back is the host's sync point, so it happens at fetch, not inside `execute`.
    Pickling (a Ray stage's reply) reads them back first. `ids_on` gives them as a tensor (stage 0
    feeds run-ahead steps from it).
    """

    __slots__ = ("_device_token_ids", "_token_ids", "logprobs", "top_logprobs")

    def __init__(
        self,
        token_ids: list[int] | None = None,
        logprobs: list[float] | None = None,
        top_logprobs: list[list[tuple[int, float]]] | None = None,
        *,
        device_token_ids: Tensor | None = None,
    ) -> None:
        assert token_ids is not None or device_token_ids is not None, "host or device ids"
        self._token_ids = token_ids
        self._device_token_ids = device_token_ids  # [N] int64
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs

    @property
    def token_ids(self) -> list[int]:
        if self._token_ids is None:
            assert self._device_token_ids is not None
            self._token_ids = self._device_token_ids.tolist()
        return self._token_ids

    def ids_on(self, device: torch.device) -> Tensor:
        """The ids as a [N] int64 tensor on `device` (no host round-trip while still there)."""
        ids = self._device_token_ids
        if ids is None:
            ids = torch.tensor(self.token_ids, dtype=torch.long)  # [N]
        return ids.to(device)

    def __reduce__(self) -> tuple[type[SamplerOutput], tuple[Any, ...]]:
        return (SamplerOutput, (self.token_ids, self.logprobs, self.top_logprobs))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SamplerOutput):
            return NotImplemented
        return (self.token_ids, self.logprobs, self.top_logprobs) == (
            other.token_ids,
            other.logprobs,
            other.top_logprobs,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"SamplerOutput(token_ids={self.token_ids!r}, logprobs={self.logprobs!r}, "
            f"top_logprobs={self.top_logprobs!r})"
        )


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request RNG, created once when the request is added; None when unseeded."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Turns logits into tokens; all-greedy batches take an argmax-only fast path."""

    def __init__(self, *, seed: int | None = None) -> None:
        """`seed` seeds the shared generator used by rows without their own (reproducible tests)."""
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample one token per row of `logits` [N, V] (float32); `logits` is not modified."""
        params = batch.params
        num_rows = logits.shape[0]
        assert num_rows == len(params) == len(batch.generators), (
            "one SamplingBatch row per logit row"
        )
        # One pass over the rows decides which steps run at all (a plain greedy batch skips them).
        want_logprobs, all_greedy, processed = False, True, logits
        if _needs_processing(params):
            want_logprobs = any(p.logprobs or p.top_logprobs > 0 for p in params)
            all_greedy = all(p.greedy for p in params)
            processed = apply_min_tokens(logits, batch)  # [N, V]
            processed = apply_penalties(processed, batch)  # [N, V]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None  # [N, V]
        # [N]: argmax for an all-greedy batch, else warped and sampled rows
        chosen = processed.argmax(dim=-1) if all_greedy else self._sample(processed, batch)
        if raw_logprobs is None:
            return SamplerOutput(device_token_ids=chosen)
        return _gather_logprobs(raw_logprobs, chosen, params)

    def _sample(self, logits: Tensor, batch: SamplingBatch) -> Tensor:
        """Greedy rows take argmax; the others are warped and sampled by the exponential race."""
        params = batch.params
        device = logits.device
        rows = [i for i, p in enumerate(params) if not p.greedy]
        row_index = torch.tensor(rows, device=device)  # [S]
        sub = logits.index_select(0, row_index)  # [S, V]
        sub_params = [params[i] for i in rows]
        temperature = torch.tensor([p.temperature for p in sub_params], device=device)  # [S]
        sub = sub / temperature.unsqueeze(1)  # [S, V]
        sub = apply_top_k_top_p(sub, sub_params)  # [S, V]
        sub = apply_min_p(sub, sub_params)  # [S, V]
        noise = self._exponential_noise(sub.shape, [batch.generators[i] for i in rows], device)
        # Exponential race: argmax(p / q), q ~ Exp(1), draws from softmax(sub); done in log space.
        # follows https://en.wikipedia.org/wiki/Gumbel_distribution#Gumbel_reparametrization_tricks
        scores = sub - noise.clamp_min_(_MIN_NOISE).log_()  # [S, V]
        sampled = scores.argmax(dim=-1)  # [S]
        if len(rows) == len(params):
            return sampled
        chosen = logits.argmax(dim=-1)  # [N]
        chosen[row_index] = sampled
        return chosen

    def _exponential_noise(
        self,
        shape: torch.Size,
        generators: Sequence[torch.Generator | None],
        device: torch.device,
    ) -> Tensor:
        """Exp(1) noise [S, V]: a seeded row draws only from its own generator, V values per step,
        so its samples do not depend on the other rows; unseeded rows share one generator."""
        noise = torch.empty(shape, device=device)  # [S, V]
        unseeded = [i for i, g in enumerate(generators) if g is None]
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        if unseeded:
            shared = torch.empty(len(unseeded), shape[1], device=device)  # [U, V]
            shared.exponential_(generator=self._shared_generator(device))
            unseeded_index = torch.tensor(unseeded, device=device)  # [U]
            noise[unseeded_index] = shared
        return noise

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._shared[device] = generator
        return generator


def _needs_processing(params: Sequence[SamplingParams]) -> bool:
    """Whether any row is other than plain greedy: sampled, logprobs, min_tokens or penalties."""
    return not all(map(is_plain_greedy, params))


def is_plain_greedy(params: SamplingParams) -> bool:
    """A row whose token is the argmax of its raw logits: greedy, no logprobs, no min_tokens,
    no penalties (a grammar, applied outside the sampler, is the caller's to check)."""
    return not (
        params.temperature != 0.0
        or params.logprobs
        or params.top_logprobs > 0
        or params.min_tokens > 0
        or params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def _row_stop_ids(batch: SamplingBatch, row: int) -> list[int]:
    params = batch.params[row]
    ids = list(params.stop_token_ids)
    if batch.stop_token_ids and not params.ignore_eos:
        ids.extend(batch.stop_token_ids[row])
    return ids


def apply_min_tokens(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Stop ids get -inf while a row has fewer than `min_tokens` outputs (HF MinNewTokens)."""
    rows: list[int] = []
    cols: list[int] = []
    vocab_size = logits.shape[1]
    for i, params in enumerate(batch.params):
        if len(batch.output_token_ids[i]) >= params.min_tokens:
            continue
        for token_id in _row_stop_ids(batch, i):
            if 0 <= token_id < vocab_size:
                rows.append(i)
                cols.append(token_id)
    if not rows:
        return logits
    masked = logits.clone()  # [N, V]
    row_index = torch.tensor(rows, device=logits.device)  # [M]
    col_index = torch.tensor(cols, device=logits.device)  # [M]
    masked.index_put_((row_index, col_index), torch.tensor(float("-inf"), device=logits.device))
    return masked


def _padded_ids(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Tensor:
    """Right-padded id matrix [R, max_len] (at least one column); pads use `pad_id`."""
    width = max(1, max(len(s) for s in seqs))
    flat = [list(s) + [pad_id] * (width - len(s)) for s in seqs]
    return torch.tensor(flat, dtype=torch.long, device=device)  # [R, max_len]


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition penalty (HF: prompt + output, divide positive / multiply negative), then
    presence and frequency penalties (OpenAI: output tokens only, subtracted)."""
    params = batch.params
    need_rep = any(p.repetition_penalty != 1.0 for p in params)
    need_openai = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
    if not (need_rep or need_openai):
        return logits
    num_rows, vocab_size = logits.shape
    device = logits.device
    out = logits.clone()  # [N, V]
    if need_rep:
        seqs = [
            [*batch.prompt_token_ids[i], *batch.output_token_ids[i]]
            if p.repetition_penalty != 1.0
            else []
            for i, p in enumerate(params)
        ]
        ids = _padded_ids(seqs, vocab_size, device)  # [N, L]
        seen = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=device)  # [N, V+1]
        seen.scatter_(1, ids, True)
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)  # [N]
        penalty = penalty.unsqueeze(1)  # [N, 1]
        penalised = torch.where(out < 0, out * penalty, out / penalty)  # [N, V]
        out = torch.where(seen[:, :vocab_size], penalised, out)  # [N, V]
    if need_openai:
        ids = _padded_ids(batch.output_token_ids, vocab_size, device)  # [N, L]
        counts = torch.zeros(num_rows, vocab_size + 1, device=device)  # [N, V+1]
        counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))  # ones [N, L]
        counts = counts[:, :vocab_size]  # [N, V]
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)  # [N]
        presence = torch.tensor([p.presence_penalty for p in params], device=device)  # [N]
        out -= frequency.unsqueeze(1) * counts + presence.unsqueeze(1) * (counts > 0)
    return out


def apply_top_k_top_p(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """HF top-k (keep every token >= the k-th largest, ties included) then HF top-p (drop the
    ascending-sorted tail whose cumulative mass is <= 1 - p, always keeping the best token)."""
    vocab_size = logits.shape[1]
    use_k = any(0 < p.top_k < vocab_size for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    if not (use_k or use_p):
        return logits
    device = logits.device
    ascending, order = logits.sort(dim=-1, stable=True)  # [S, V] each
    if use_k:
        # top_k 0 (off) or >= V keeps everything: threshold at the smallest logit
        k_values = [min(p.top_k, vocab_size) or vocab_size for p in params]
        top_k = torch.tensor(k_values, device=device)  # [S]
        kth = ascending.gather(1, (vocab_size - top_k).unsqueeze(1))  # [S, 1]
        ascending = ascending.masked_fill(ascending < kth, float("-inf"))  # [S, V]
    if use_p:
        top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)  # [S, 1]
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)  # [S, V]
        drop = (cumulative <= 1.0 - top_p) & (top_p < 1.0)  # [S, V]
        drop[:, -1] = False
        ascending = ascending.masked_fill(drop, float("-inf"))  # [S, V]
    return torch.empty_like(logits).scatter_(1, order, ascending)  # [S, V]


def apply_min_p(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """HF min-p: drop tokens whose probability is below min_p x the top probability."""
    if not any(p.min_p > 0.0 for p in params):
        return logits
    min_p = torch.tensor([p.min_p for p in params], device=logits.device).unsqueeze(1)  # [S, 1]
    probs = logits.softmax(dim=-1)  # [S, V]
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # [S, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))  # [S, V]


def _gather_logprobs(
    raw_logprobs: Tensor,
    chosen: Tensor,
    params: Sequence[SamplingParams],
) -> SamplerOutput:
    """Chosen-token logprob for every row, plus each row's `top_logprobs` best alternatives."""
    chosen_lp: list[float] = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    max_top = max(p.top_logprobs for p in params)
    top: list[list[tuple[int, float]]] = [[] for _ in params]
    if max_top > 0:
        values, indices = raw_logprobs.topk(max_top, dim=-1)  # [N, max_top] each
        value_rows: list[list[float]] = values.tolist()
        index_rows: list[list[int]] = indices.tolist()
        for i, p in enumerate(params):
            k = p.top_logprobs
            top[i] = list(zip(index_rows[i][:k], value_rows[i][:k], strict=True))
    return SamplerOutput(
        chosen.tolist(), chosen_lp, top, device_token_ids=chosen
    )  # ids on the host and (for run-ahead steps) on the device
