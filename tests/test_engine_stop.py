"""Tests for engine/stop.py: eos / stop ids / stop strings, min_tokens, max_tokens, streaming,
and the vectorised token-level check (TokenStops)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from internvl_core.config import SamplingParams
from internvl_core.engine.sequence import SequenceStatus
from internvl_core.engine.stop import (
    StopChecker,
    StopDecision,
    TokenStops,
    finalize_chat_response,
)

EOS = 92542


def _run(checker: StopChecker, steps: list[tuple[int, str]]) -> tuple[int, StopDecision | None]:
    """Feed (token id, text delta) pairs; return the step index that stopped and the decision."""
    ids: list[int] = []
    text = ""
    for i, (token_id, delta) in enumerate(steps):
        ids.append(token_id)
        text += delta
        decision = checker.check(ids, text)
        if decision is not None:
            return i, decision
    return len(steps), None


def test_eos_stops_unless_ignore_eos() -> None:
    steps = [(5, "a"), (6, "b"), (EOS, ""), (7, "c")]
    step, decision = _run(StopChecker(SamplingParams(), eos_token_ids=(EOS,)), steps)
    assert (step, decision) == (2, StopDecision("stop", EOS, None))
    ignored = StopChecker(SamplingParams(ignore_eos=True), eos_token_ids=(EOS,))
    assert _run(ignored, steps) == (4, None)


def test_stop_token_ids_stop_even_with_ignore_eos() -> None:
    params = SamplingParams(ignore_eos=True, stop_token_ids=(6,))
    step, decision = _run(StopChecker(params, eos_token_ids=(EOS,)), [(EOS, ""), (6, "b")])
    assert step == 1 and decision == StopDecision("stop", 6, 0)  # the stop token's text is cut


def test_stop_token_text_is_cut_when_specials_are_kept() -> None:
    params = SamplingParams(skip_special_tokens=False)
    steps = [(5, "abc"), (EOS, "<|im_end|>")]
    _, decision = _run(StopChecker(params, eos_token_ids=(EOS,)), steps)
    assert decision == StopDecision("stop", EOS, 3)


def test_min_tokens_delays_eos_and_stop_strings() -> None:
    params = SamplingParams(min_tokens=3, stop=("xy",), stop_token_ids=(9,))
    checker = StopChecker(params, eos_token_ids=(EOS,))
    steps = [(EOS, ""), (9, ""), (5, "xy"), (EOS, "")]
    step, decision = _run(checker, steps)
    assert step == 2 and decision == StopDecision("stop", "xy", 0)  # strings from min_tokens on
    checker = StopChecker(params, eos_token_ids=(EOS,))
    step, decision = _run(checker, [(5, "a"), (6, "b"), (EOS, ""), (EOS, "")])
    assert step == 3 and decision == StopDecision("stop", EOS, None)  # ids after min_tokens


def test_max_tokens_gives_length_and_stop_wins_on_the_same_token() -> None:
    checker = StopChecker(SamplingParams(max_tokens=3), eos_token_ids=(EOS,))
    assert _run(checker, [(5, "a"), (6, "b"), (7, "c"), (8, "d")]) == (2, StopDecision("length"))
    checker = StopChecker(SamplingParams(max_tokens=2), eos_token_ids=(EOS,))
    assert _run(checker, [(5, "a"), (EOS, "")]) == (1, StopDecision("stop", EOS, None))
    checker = StopChecker(SamplingParams(max_tokens=1, min_tokens=5), eos_token_ids=(EOS,))
    assert _run(checker, [(5, "a")]) == (0, StopDecision("length"))


def test_stop_string_spanning_tokens_is_found_and_cut() -> None:
    params = SamplingParams(stop=("o wor", "zzz"))
    steps = [(1, "Hel"), (2, "lo w"), (3, "or"), (4, "ld!")]
    step, decision = _run(StopChecker(params, eos_token_ids=(EOS,)), steps)
    assert step == 2 and decision is not None
    assert decision.stop_reason == "o wor"
    assert "Hello wor"[: decision.truncate_text_to] == "Hell"


def test_earliest_stop_string_wins() -> None:
    params = SamplingParams(stop=("cd", "bc", "b"))
    step, decision = _run(StopChecker(params, eos_token_ids=(EOS,)), [(1, "a"), (2, "bcd")])
    assert step == 1 and decision == StopDecision("stop", "bc", 1)


def test_only_the_tail_is_searched() -> None:
    # A stop string wholly inside text that was checked before min_tokens is not found later.
    params = SamplingParams(stop=("ab",), min_tokens=2)
    checker = StopChecker(params, eos_token_ids=(EOS,))
    assert _run(checker, [(1, "ab"), (2, "c"), (3, "d")]) == (3, None)


def test_safe_text_len_holds_back_a_possible_stop_prefix() -> None:
    checker = StopChecker(SamplingParams(stop=("world", "lo")), eos_token_ids=(EOS,))
    assert checker.safe_text_len("Hello wo") == 6
    assert checker.safe_text_len("Hel") == 2
    assert checker.safe_text_len("Hex") == 3
    assert checker.safe_text_len("") == 0
    assert StopChecker(SamplingParams(), eos_token_ids=(EOS,)).safe_text_len("abc") == 3


def test_streamed_text_never_shows_part_of_a_stop_string() -> None:
    rng = random.Random(0)
    stops = ("</answer>", "##", "\n\nUser:")
    for _ in range(200):
        body = "".join(
            rng.choice(["a", "b", " ", "<", "/", "#", "\n", "User", ":"]) for _ in range(30)
        )
        text = body + rng.choice(stops) + "tail"
        checker = StopChecker(SamplingParams(stop=stops), eos_token_ids=(EOS,))
        streamed, sofar, ids = "", "", []
        decision = None
        while decision is None and len(sofar) < len(text):
            sofar = text[: len(sofar) + rng.randint(1, 4)]
            ids.append(len(ids))
            decision = checker.check(ids, sofar)
            if decision is None:
                streamed = sofar[: checker.safe_text_len(sofar)]
                assert all(s not in streamed for s in stops)
        assert decision is not None and decision.truncate_text_to is not None
        final = sofar[: decision.truncate_text_to]
        assert final.startswith(streamed)
        assert all(s not in final for s in stops)


def test_include_stop_str_in_output_keeps_the_stop_text() -> None:
    params = SamplingParams(stop=("o wor",), include_stop_str_in_output=True)
    steps = [(1, "Hel"), (2, "lo w"), (3, "orld")]
    step, decision = _run(StopChecker(params, eos_token_ids=(EOS,)), steps)
    assert step == 2 and decision is not None and decision.stop_reason == "o wor"
    assert "Hello world"[: decision.truncate_text_to] == "Hello wor"  # text after it is cut
    keep_ids = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True)
    _, decision = _run(StopChecker(keep_ids, eos_token_ids=(EOS,)), [(5, "a"), (EOS, "<|e|>")])
    assert decision == StopDecision("stop", EOS, None)  # the stop token's text stays
    # Nothing is held back: a partial stop string is text the client gets either way.
    assert StopChecker(params, eos_token_ids=(EOS,)).safe_text_len("Hello wo") == 8


def test_finalize_chat_response_matches_original() -> None:
    for text, sep in [
        ("  The answer.<|im_end|>garbage", "<|im_end|>"),
        ("\nNo separator here \n", "<|end|>"),
        ("a<|end|>b<|end|>c", "<|end|>"),
        ("", "<|im_end|>"),
    ]:
        assert finalize_chat_response(text, sep) == text.split(sep)[0].strip()


def _token_level(checker: StopChecker, outputs: list[int]) -> SequenceStatus | None:
    decision = checker.check(outputs, "")
    return None if decision is None else SequenceStatus.from_finish_reason(decision.finish_reason)


@pytest.mark.parametrize("seed", range(4))
def test_token_stops_match_the_stop_checker_at_every_position(seed: int) -> None:
    """The vectorised batch check ends a request exactly where StopChecker does (stop ids after
    min_tokens, eos unless ignore_eos, max_tokens), for every output count, in one batch."""
    rng = random.Random(seed)
    eos = (7,)
    table = TokenStops(capacity=2)  # grows: more requests than rows, more ids than columns
    params = [
        SamplingParams(
            max_tokens=rng.randint(1, 12),
            min_tokens=rng.randint(0, 4),
            ignore_eos=rng.random() < 0.3,
            stop_token_ids=tuple(rng.sample(range(3, 12), rng.randint(0, 3))),
        )
        for _ in range(9)
    ]
    rows = [table.add(p, eos_token_ids=eos) for p in params]
    assert sorted(rows) == list(range(9)) and table.num_live == 9
    outputs = [[rng.randrange(3, 12) for _ in range(12)] for _ in params]
    for num in range(1, 13):
        ended = dict(
            table.finished(
                np.array(rows),
                np.array([out[num - 1] for out in outputs]),
                np.full(len(rows), num),
            )
        )
        for i, p in enumerate(params):
            expected = _token_level(StopChecker(p, eos_token_ids=eos), outputs[i][:num])
            assert ended.get(i) == expected, (p, outputs[i][:num])


def test_token_stop_rows_are_reused_after_free() -> None:
    table = TokenStops(capacity=2)
    a = table.add(SamplingParams(max_tokens=1), eos_token_ids=(5,))
    b = table.add(SamplingParams(max_tokens=9, ignore_eos=True), eos_token_ids=(5,))
    table.free(a)
    c = table.add(SamplingParams(max_tokens=9), eos_token_ids=(5,))
    assert c == a and table.num_live == 2
    # Row c holds c's rules, not a's: one output is not its length, eos stops it; b ignores eos.
    ended = table.finished(np.array([c, b]), np.array([5, 5]), np.array([1, 1]))
    assert ended == [(0, SequenceStatus.FINISHED_STOPPED)]
