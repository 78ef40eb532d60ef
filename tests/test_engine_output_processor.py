"""OutputProcessor: a big step is processed in chunks (the GIL is yielded between them) with the
same outputs, in the same order, as token by token; stops end requests in any chunk."""

from __future__ import annotations

import pytest

from internvl_core.config import SamplingParams
from internvl_core.engine import output_processor
from internvl_core.engine.output_processor import OutputProcessor, RequestState, StepTokens
from internvl_core.engine.sequence import Request, Sequence, SequenceStatus
from internvl_core.engine.stop import StopChecker


def _states(num: int) -> dict[str, RequestState]:
    states = {}
    for i in range(num):
        params = SamplingParams(max_tokens=2 if i % 5 == 0 else 8, logprobs=i % 3 == 0)
        seq = Sequence(Request.create(f"r{i}", [1, 2, 3], params), block_size=4)
        states[seq.request_id] = RequestState(seq, StopChecker(params, eos_token_ids=()), None)
    return states


def _step(states: dict[str, RequestState], token: int) -> StepTokens:
    seqs = [state.seq for state in states.values()]
    for seq in seqs:
        seq.append_token(token)
    logprobs = [[-0.5] if seq.request.params.logprobs else None for seq in seqs]
    return StepTokens(seqs, [token] * len(seqs), logprobs=logprobs)


def test_chunked_equals_token_by_token(monkeypatch: pytest.MonkeyPatch) -> None:
    every = output_processor.YIELD_EVERY
    num = 2 * every + 6
    yields: list[float] = []
    monkeypatch.setattr(output_processor.time, "sleep", yields.append)
    finished: dict[str, SequenceStatus] = {}
    chunked = OutputProcessor(
        _states(num), lambda seq, status: finished.setdefault(seq.request_id, status)
    )
    whole = OutputProcessor(_states(num), lambda seq, status: None)
    for token in (7, 8):
        got = chunked.process(_step(chunked.states, token))
        monkeypatch.setattr(output_processor, "YIELD_EVERY", num)  # one chunk: no yields
        want = whole.process(_step(whole.states, token))
        monkeypatch.setattr(output_processor, "YIELD_EVERY", every)
        assert got == want and [o.request_id for o in got] == [f"r{i}" for i in range(num)]
    assert len(yields) == 2 * 3, "a yield before each chunk of a big step"
    assert sorted(finished) == sorted(f"r{i}" for i in range(0, num, 5))
    assert all(status is SequenceStatus.FINISHED_LENGTH for status in finished.values())
    assert len(chunked.states) == num - len(finished)
