"""Tests for engine/sampler.py: greedy, warper kept sets, penalties, seeds, logprobs, min_tokens."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from internvl_core.config import SamplingParams
from internvl_core.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    is_plain_greedy,
    make_generator,
)

VOCAB = 32


def _batch(
    params: list[SamplingParams],
    *,
    generators: list[torch.Generator | None] | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    stop_ids: list[tuple[int, ...]] | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch(
        params=params,
        generators=generators if generators is not None else [None] * n,
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(n)],
        output_token_ids=outputs if outputs is not None else [[] for _ in range(n)],
        stop_token_ids=stop_ids if stop_ids is not None else [],
    )


def _sampled_set(logits_row: list[float], params: SamplingParams, draws: int = 3000) -> set[int]:
    """Tokens drawn when the same row is sampled `draws` times (one batch, shared generator)."""
    logits = torch.tensor([logits_row]).repeat(draws, 1)  # [draws, V]
    out = Sampler(seed=0)(logits, _batch([params] * draws))
    return set(out.token_ids)


def test_greedy_equals_argmax_first_max_and_leaves_logits_untouched() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB)  # [6, V]
    logits[2, 5] = logits[2, 9] = logits[2].max() + 1.0  # tie: first index wins
    before = logits.clone()  # [6, V]
    out = Sampler()(logits, _batch([SamplingParams()] * 6))
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.token_ids[2] == 5
    assert out.logprobs is None and out.top_logprobs is None
    torch.testing.assert_close(logits, before, rtol=0, atol=0)


def test_all_greedy_batch_takes_fast_path_without_sort_or_softmax() -> None:
    logits = torch.randn(4, VOCAB)  # [4, V]
    sampler = Sampler()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sampler(logits, _batch([SamplingParams()] * 4))
    names = {event.name for event in prof.events()}
    assert not any("sort" in n or "softmax" in n or "exponential" in n for n in names), names


def test_greedy_rows_in_mixed_batch_are_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, VOCAB)  # [5, V]
    params = [SamplingParams(temperature=1.0 if i % 2 else 0.0) for i in range(5)]
    out = Sampler(seed=3)(logits, _batch(params))
    argmax = logits.argmax(dim=-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


ROW = [4.0, 3.0, 2.8, 2.5, 1.0, 0.0, -1.0, -30.0]


@pytest.mark.parametrize(
    ("row", "params", "kept"),
    [
        (ROW, SamplingParams(temperature=1.0, top_k=1), {0}),
        (ROW, SamplingParams(temperature=1.0, top_k=4), {0, 1, 2, 3}),
        ([3.0, 3.0, 3.0, 1.0], SamplingParams(temperature=1.0, top_k=1), {0, 1, 2}),  # HF ties
        (ROW, SamplingParams(temperature=1.0, top_p=0.5), {0}),
        (ROW, SamplingParams(temperature=1.0, top_p=0.6), {0, 1}),
        (ROW, SamplingParams(temperature=1.0, top_p=0.9), {0, 1, 2, 3}),
        (ROW, SamplingParams(temperature=1.0, min_p=0.35), {0, 1}),
        (ROW, SamplingParams(temperature=1.0, min_p=0.2), {0, 1, 2, 3}),
        (ROW, SamplingParams(temperature=1.0, top_k=4, top_p=0.8), {0, 1, 2}),
        (ROW, SamplingParams(temperature=0.5, top_p=0.9), {0, 1, 2}),  # T before top-p
    ],
)
def test_warper_kept_sets_exact(row: list[float], params: SamplingParams, kept: set[int]) -> None:
    logits = torch.tensor([row])  # [1, V]
    warped = apply_top_k_top_p(logits / params.temperature, [params])  # [1, V]
    warped = apply_min_p(warped, [params])  # [1, V]
    assert set(torch.isfinite(warped[0]).nonzero().flatten().tolist()) == kept
    assert _sampled_set(row, params) == kept


def test_top_p_matches_literal_reference() -> None:
    # Reference: sort ascending, drop the prefix whose cumulative mass <= 1 - p, keep the best.
    torch.manual_seed(2)
    logits = torch.randn(3, 50)  # [3, 50]
    params = [SamplingParams(temperature=1.0, top_p=p) for p in (0.3, 0.8, 1.0)]
    warped = apply_top_k_top_p(logits, params)  # [3, 50]
    for row, p in enumerate((0.3, 0.8, 1.0)):
        probs = logits[row].softmax(-1).tolist()
        order = sorted(range(50), key=lambda t: probs[t])
        kept, mass = set(), 0.0
        for rank, t in enumerate(order):
            mass += probs[t]
            if mass > 1.0 - p or rank == 49:
                kept.add(t)
        assert set(torch.isfinite(warped[row]).nonzero().flatten().tolist()) == kept


def test_temperature_matches_softmax_frequencies() -> None:
    row = [1.0, 0.5, 0.0, -0.5]
    draws = 20000
    logits = torch.tensor([row]).repeat(draws, 1)  # [draws, 4]
    params = SamplingParams(temperature=0.7)
    out = Sampler(seed=11)(logits, _batch([params] * draws))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / draws  # [4]
    expected = torch.tensor(row).div(0.7).softmax(-1)  # [4]
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def _reference_penalties(
    logits: list[float], prompt: list[int], output: list[int], params: SamplingParams
) -> list[float]:
    scores = list(logits)
    for token in set(prompt + output):  # HF RepetitionPenaltyLogitsProcessor
        score = scores[token]
        rp = params.repetition_penalty
        scores[token] = score * rp if score < 0 else score / rp
    for token in set(output):  # OpenAI presence / frequency
        scores[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return scores


def test_penalties_match_literal_reference() -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, VOCAB)  # [4, V]
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-0.4, frequency_penalty=1.5),
    ]
    prompts = [[1, 2, 3, 3], [4, 5], [6, 7, 8], [1, 9, 9, 31]]
    outputs = [[3, 10, 10], [5, 5], [7, 11, 11, 11], [0, 9]]
    batch = _batch(params, prompts=prompts, outputs=outputs)
    got = apply_penalties(logits, batch)  # [4, V]
    expected = torch.tensor(
        [
            _reference_penalties(logits[i].tolist(), prompts[i], outputs[i], params[i])
            for i in range(4)
        ]
    )  # [4, V]
    torch.testing.assert_close(got, expected)
    # Greedy decoding follows the penalised logits (HF applies processors before argmax).
    out = Sampler()(logits, batch)
    assert out.token_ids == expected.argmax(dim=-1).tolist()


def _seeded_run(rows: list[tuple[SamplingParams, int | None]], seeded_row: int) -> list[int]:
    """Decode 15 steps of a batch; return the tokens of `seeded_row` (its logits are fixed)."""
    sampler = Sampler()
    generators = [make_generator(p.seed) for p, _ in rows]
    gen_logits = torch.Generator().manual_seed(99)
    tokens: list[int] = []
    outputs: list[list[int]] = [[] for _ in rows]
    for step in range(15):
        logits = torch.randn(len(rows), VOCAB, generator=gen_logits)  # [N, V]
        logits[seeded_row] = torch.sin(torch.arange(VOCAB) * (step + 1.0))
        out = sampler(logits, _batch([p for p, _ in rows], generators=generators, outputs=outputs))
        for i, t in enumerate(out.token_ids):
            outputs[i].append(t)
        tokens.append(out.token_ids[seeded_row])
    return tokens


def test_seeded_rows_are_reproducible_across_batches_and_positions() -> None:
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=20, seed=1234)
    alone = _seeded_run([(target, None)], 0)
    mixed = _seeded_run(
        [
            (SamplingParams(temperature=1.0), None),
            (SamplingParams(), None),
            (SamplingParams(temperature=1.2, seed=7), None),
            (target, None),
        ],
        3,
    )
    first = _seeded_run([(target, None), (SamplingParams(temperature=0.5, min_p=0.1), None)], 0)
    assert alone == mixed == first
    assert alone == _seeded_run([(target, None)], 0)  # across runs
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=20, seed=4321)
    assert _seeded_run([(other_seed, None)], 0) != alone


def test_logprobs_are_raw_log_softmax() -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, VOCAB)  # [3, V]
    params = [
        SamplingParams(logprobs=True, top_logprobs=3),
        SamplingParams(temperature=1.5, repetition_penalty=1.5, logprobs=True),
        SamplingParams(temperature=0.8, top_logprobs=5, seed=5),
    ]
    batch = _batch(params, outputs=[[1], [2, 3], [4]], prompts=[[5], [6], [7]])
    out = Sampler(seed=0)(logits, batch)
    expected = torch.log_softmax(logits, dim=-1)  # [3, V]
    assert out.logprobs is not None and out.top_logprobs is not None
    chosen = torch.tensor([expected[i, t] for i, t in enumerate(out.token_ids)])  # [3]
    torch.testing.assert_close(torch.tensor(out.logprobs), chosen)
    for i, k in enumerate((3, 0, 5)):
        values, indices = expected[i].topk(k) if k else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in out.top_logprobs[i]] == indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in out.top_logprobs[i]]), values)


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    logits = torch.zeros(3, VOCAB)  # [3, V]
    logits[:, 7] = 10.0  # eos
    logits[:, 8] = 9.0  # a user stop id
    logits[:, 9] = 8.0
    params = [
        SamplingParams(min_tokens=2, stop_token_ids=(8,)),
        SamplingParams(min_tokens=2, stop_token_ids=(8,), ignore_eos=True),
        SamplingParams(min_tokens=2, stop_token_ids=(8,), temperature=1.0, top_k=1),
    ]
    stop_ids = [(7,), (7,), (7,)]
    early = Sampler()(logits, _batch(params, outputs=[[1], [1], [1]], stop_ids=stop_ids))
    assert early.token_ids == [9, 7, 9]  # ignore_eos: eos is an ordinary token, not masked
    done = Sampler()(logits, _batch(params, outputs=[[1, 2]] * 3, stop_ids=stop_ids))
    assert done.token_ids == [7, 7, 7]


def test_make_generator() -> None:
    assert make_generator(None) is None
    a, b = make_generator(5), make_generator(5)
    assert a is not None and b is not None
    assert torch.rand(3, generator=a).tolist() == torch.rand(3, generator=b).tolist()
    assert math.isfinite(torch.rand(1, generator=a).item())


def test_output_ids_stay_on_the_device_until_read() -> None:
    logits = torch.randn(3, VOCAB)
    out = Sampler()(logits, _batch([SamplingParams()] * 3))
    expected = logits.argmax(dim=-1).tolist()
    assert out == SamplerOutput(expected)
    assert out.token_ids == expected and out.token_ids is out.token_ids  # read back once
    deferred = SamplerOutput(device_token_ids=logits.argmax(dim=-1))
    # A Ray stage's reply crosses the wire with host ids.
    restored = pickle.loads(pickle.dumps(deferred))
    assert restored.token_ids == expected and restored.logprobs is None


@pytest.mark.parametrize(
    ("params", "plain"),
    [
        (SamplingParams(), True),
        (SamplingParams(seed=3, stop=("x",), max_tokens=4), True),
        (SamplingParams(temperature=0.5), False),
        (SamplingParams(min_tokens=1), False),
        (SamplingParams(repetition_penalty=1.2), False),
        (SamplingParams(presence_penalty=0.1), False),
        (SamplingParams(frequency_penalty=0.1), False),
        (SamplingParams(logprobs=True), False),
        (SamplingParams(top_logprobs=2), False),
    ],
)
def test_plain_greedy_rows_are_the_argmax(params: SamplingParams, plain: bool) -> None:
    assert is_plain_greedy(params) is plain
    logits = torch.randn(2, VOCAB)
    out = Sampler(seed=0)(logits, _batch([params] * 2, outputs=[[1, 2], [3]], prompts=[[4], [5]]))
    if plain:
        assert out.token_ids == logits.argmax(dim=-1).tolist()
