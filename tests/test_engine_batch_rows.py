"""BatchRows: rows and in-flight counters as the scheduler plans them; run-ahead sources."""

from __future__ import annotations

from internvl_core.config import SamplingParams
from internvl_core.engine.batch import SamplingRequest
from internvl_core.engine.batch_rows import BatchRows
from internvl_core.engine.sequence import Request, Sequence


def _seq(rid: str, prompt: list[int]) -> Sequence:
    seq = Sequence(Request.create(rid, prompt, SamplingParams()), block_size=4)
    seq.block_table = [0, 1]
    return seq


def _request(seq: Sequence) -> SamplingRequest:
    return SamplingRequest(seq.request_id, seq.request.params, [], [], ())


def test_run_ahead_rows_index_their_sources_concatenated_in_order() -> None:
    a, b, c = _seq("a", [1, 2, 3]), _seq("b", [4, 5]), _seq("c", [6])
    for seq, pending in ((a, (7, 2)), (b, (5, 0)), (c, (7, 0))):
        seq.num_computed_tokens = len(seq.token_ids)  # its next token is still on the device
        seq.num_in_flight = seq.num_in_flight_tokens = seq.num_pending_samples = 1
        seq.pending_sample = pending
    rows = BatchRows(9)
    rows.add_run_ahead(a, 5, _request(a))
    rows.add(_seq("d", [8, 9]), 2, _request)  # a prefill between them
    rows.add_run_ahead(b, 4, _request(b))
    rows.add_run_ahead(c, 3, _request(c))
    num_samples = {5: 3, 7: 4}
    batch = rows.build(block_size=4, finished_request_ids=[], num_samples_of=num_samples.get)
    assert batch.input_token_ids == [0, 8, 9, 0, 0]
    assert batch.deferred_token_rows == [0, 3, 4]
    assert batch.deferred_source_batch_ids == [5, 7]  # submission order
    assert batch.deferred_sample_rows == [3 + 2, 0, 3 + 0]  # batch 7's rows come after 5's 3
    assert batch.context_lens == [4, 0, 3, 2]
    assert (a.num_in_flight, a.num_pending_samples, a.pending_sample) == (2, 2, (9, 0))
    assert c.pending_sample == (9, 3)


def test_one_source_needs_no_sample_counts() -> None:
    a = _seq("a", [1, 2])
    a.num_computed_tokens, a.num_in_flight, a.num_pending_samples = 2, 1, 1
    a.pending_sample = (3, 1)
    rows = BatchRows(4)
    rows.add_run_ahead(a, 3, _request(a))

    def never(batch_id: int) -> int:
        raise AssertionError("not needed")

    batch = rows.build(block_size=4, finished_request_ids=["x"], num_samples_of=never)
    assert (batch.deferred_source_batch_ids, batch.deferred_sample_rows) == ([3], [1])
    assert batch.finished_request_ids == ["x"]
