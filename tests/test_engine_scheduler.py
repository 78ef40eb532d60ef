"""Scheduler with plain ints: batches, chunked prefill, preemption order, prefix hits, no leaks."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from internvl_core.config import EngineConfig, SamplingParams
from internvl_core.engine.block_manager import BlockManager
from internvl_core.engine.scheduler import Scheduler
from internvl_core.engine.sequence import Request, Sequence, SequenceStatus

IMG = 99
MakeScheduler = Callable[..., Scheduler]


@pytest.fixture
def make_scheduler() -> Iterator[MakeScheduler]:
    made: list[Scheduler] = []

    def make(
        num_blocks: int = 16, block_size: int = 4, *, async_decode: bool = False, **config: object
    ) -> Scheduler:
        cfg = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **config)
        bm = BlockManager(num_blocks, block_size, enable_prefix_caching=cfg.enable_prefix_caching)
        made.append(Scheduler(cfg, bm, async_decode=async_decode))
        return made[-1]

    yield make
    for sched in made:
        for seq in list(sched.running) + list(sched.waiting):
            sched.finish(seq, SequenceStatus.FINISHED_ABORTED)
        bm = sched.block_manager
        assert bm.num_free_blocks == bm.num_blocks, "leaked blocks"


def _seq(rid: str, prompt: list[int], block_size: int = 4, **kw: object) -> Sequence:
    return Sequence(Request.create(rid, prompt, SamplingParams(**kw)), block_size=block_size)


def _finish_done(sched: Scheduler, grown: list[Sequence], max_out: int) -> None:
    for seq in grown:
        if seq.num_output_tokens >= max_out:
            sched.finish(seq, SequenceStatus.FINISHED_LENGTH)


def test_prefill_then_decode_block_tables(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler()
    a, b = _seq("a", [1, 2, 3, 4, 5]), _seq("b", [6, 7, 8])
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch is not None
    assert batch.request_ids == ["a", "b"]
    assert batch.input_token_ids == [1, 2, 3, 4, 5, 6, 7, 8]
    assert batch.query_lens == [5, 3] and batch.context_lens == [0, 0]
    assert batch.block_tables == [[0, 1], [2]]
    assert batch.sample_flags == [True, True]
    assert sched.schedule() is None, "both are in flight"
    assert sched.update(batch.batch_id, [50, 60]) == [a, b]
    assert a.token_ids[-1] == 50 and a.num_computed_tokens == 5
    batch = sched.schedule()
    assert batch is not None and batch.is_decode_only
    assert batch.input_token_ids == [50, 60] and batch.context_lens == [5, 3]
    # b's 4th token fills block 2 exactly; a's 6th token stays in block 1.
    assert batch.block_tables == [[0, 1], [2]]
    sched.update(batch.batch_id, [51, 61])
    batch = sched.schedule()
    assert batch is not None and batch.block_tables == [[0, 1], [2, 3]]
    sched.finish(a, SequenceStatus.FINISHED_STOPPED)
    assert sched.block_manager.ref_count(0) == 0
    sched.update(batch.batch_id, [52, 62])  # a finished while in flight: skipped
    assert a.token_ids[-1] == 51 and b.token_ids[-1] == 62
    nxt = sched.schedule()
    assert nxt is not None and nxt.finished_request_ids == ["a"] and nxt.request_ids == ["b"]
    sched.update(nxt.batch_id, [63])


def test_chunked_prefill_mixes_with_decode(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    a = _seq("a", [1, 2])
    sched.add(a)
    batch = sched.schedule()
    assert batch is not None
    sched.update(batch.batch_id, [9])
    b = _seq("b", list(range(10, 20)))
    sched.add(b)
    chunks = []
    while b.num_output_tokens == 0:
        batch = sched.schedule()
        assert batch is not None
        chunks.append((batch.request_ids, batch.query_lens, batch.context_lens, batch.sample_flags))
        sched.update(batch.batch_id, [7] * sum(batch.sample_flags))
    assert chunks == [
        (["a", "b"], [1, 3], [2, 0], [True, False]),
        (["a", "b"], [1, 3], [3, 3], [True, False]),
        (["a", "b"], [1, 3], [4, 6], [True, False]),
        (["a", "b"], [1, 1], [5, 9], [True, True]),
    ]
    assert b.block_table == [1, 2, 4] and a.block_table == [0, 3]


def test_no_chunking_waits_for_budget(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler(max_num_batched_tokens=6, enable_chunked_prefill=False)
    sched.add(_seq("a", [1, 2, 3, 4]))
    sched.add(_seq("b", [5, 6, 7, 8]))
    batch = sched.schedule()
    assert batch is not None and batch.request_ids == ["a"], "b does not fit whole"
    sched.update(batch.batch_id, [0])
    batch = sched.schedule()
    assert batch is not None and batch.request_ids == ["a", "b"] and batch.query_lens == [1, 4]
    sched.update(batch.batch_id, [0, 0])


def test_max_num_seqs_and_fcfs(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler(num_blocks=4, max_num_seqs=2)
    sched.add(_seq("a", [1]))
    sched.add(_seq("big", list(range(12))))  # 3 blocks
    sched.add(_seq("c", [2]))
    batch = sched.schedule()
    assert batch is not None and batch.request_ids == ["a", "big"]
    sched.update(batch.batch_id, [0, 0])
    batch = sched.schedule()
    assert batch is not None and batch.request_ids == ["a"], "big needs a block; c must wait"
    assert sched.last_preempted == ["big"] and [s.request_id for s in sched.waiting] == ["big", "c"]
    sched.update(batch.batch_id, [0])


def test_preemption_order_and_recompute(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler(num_blocks=6, block_size=2, enable_prefix_caching=False)
    seqs = [_seq(n, [i, i + 1, i + 2, i + 3], block_size=2) for i, n in enumerate("abc")]
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()
    assert batch is not None and batch.block_tables == [[0, 1], [2, 3], [4, 5]]
    sched.update(batch.batch_id, [10, 20, 30])
    # Every sequence now needs a third block; none is free: the newest (c) is preempted.
    batch = sched.schedule()
    assert batch is not None
    assert sched.last_preempted == ["c"] and batch.request_ids == ["a", "b"]
    assert batch.block_tables == [[0, 1, 4], [2, 3, 5]]
    assert seqs[2].status is SequenceStatus.PREEMPTED and seqs[2].num_computed_tokens == 0
    assert sched.block_manager.num_free_blocks == 0
    sched.update(batch.batch_id, [11, 21])
    batch = sched.schedule()
    assert batch is not None and batch.request_ids == ["a", "b"] and not sched.last_preempted
    sched.update(batch.batch_id, [12, 22])
    # a needs a 4th block: b goes (c already waiting); b lands in front of c.
    batch = sched.schedule()
    assert batch is not None and sched.last_preempted == ["b"] and batch.request_ids == ["a"]
    assert batch.block_tables == [[0, 1, 4, 2]]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]
    assert sched.num_preemptions == 2
    sched.update(batch.batch_id, [13])
    sched.finish(seqs[0], SequenceStatus.FINISHED_LENGTH)
    # b recomputes prompt + its 3 outputs (4 blocks) and samples its next token; c (3 blocks)
    # does not fit beside it and waits, FCFS.
    batch = sched.schedule()
    assert batch is not None and batch.request_ids == ["b"]
    assert batch.input_token_ids == [1, 2, 3, 4, 20, 21, 22] and batch.sample_flags == [True]
    assert batch.block_tables == [[0, 1, 4, 2]]  # a's freed blocks, reused in table order
    (grown,) = sched.update(batch.batch_id, [23])
    assert grown.token_ids == [1, 2, 3, 4, 20, 21, 22, 23] and grown.num_preemptions == 1


def test_self_preemption_when_alone_and_short(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler(num_blocks=2, block_size=2, enable_prefix_caching=False)
    a, b = _seq("a", [1, 2], block_size=2), _seq("b", [3, 4], block_size=2)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch is not None
    sched.update(batch.batch_id, [5, 6])
    batch = sched.schedule()
    assert batch is not None and sched.last_preempted == ["b"] and batch.request_ids == ["a"]
    sched.update(batch.batch_id, [7])
    _finish_done(sched, [a], 2)
    batch = sched.schedule()
    assert batch is not None and batch.request_ids == ["b"] and batch.query_lens == [3]
    sched.update(batch.batch_id, [8])


def test_prefix_cache_hits(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler()
    prompt = list(range(1, 10))  # 9 tokens: 2 full blocks
    a = _seq("a", prompt)
    sched.add(a)
    batch = sched.schedule()
    assert batch is not None
    sched.update(batch.batch_id, [100])
    b = _seq("b", [*prompt[:8], 77, 78])
    sched.add(b)
    batch = sched.schedule()
    assert batch is not None and batch.request_ids == ["a", "b"]
    assert batch.context_lens == [9, 8] and batch.query_lens == [1, 2]
    assert b.block_table == [0, 1, 3] and b.num_cached_tokens == 8
    assert sched.block_manager.ref_count(0) == 2
    sched.update(batch.batch_id, [101, 200])
    # A block-aligned prompt that is fully cached still computes its last block (for logits).
    c = _seq("c", prompt[:8])
    sched.add(c)
    batch = sched.schedule()
    assert batch is not None and batch.request_ids[-1] == "c"
    assert c.num_cached_tokens == 4 and batch.query_lens[-1] == 4 and c.block_table[0] == 0
    sched.update(batch.batch_id, [0, 0, 0])
    # Decoded blocks get cached too, once all 4 of their tokens have K/V.
    assert a.num_computed_tokens == 11
    assert sched.block_manager.block_hash(a.block_table[2]) is None
    batch = sched.schedule()
    assert batch is not None
    sched.update(batch.batch_id, [0] * sum(batch.sample_flags))
    assert sched.block_manager.block_hash(a.block_table[2]) is not None
    for seq in (a, b, c):
        sched.finish(seq, SequenceStatus.FINISHED_STOPPED)
    assert sched.block_manager.num_cached_blocks >= 3
    assert sched.block_manager.prefix_cache_hit_rate == pytest.approx(3 / 5)


def test_image_rows_follow_chunks(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    embeds = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)  # [num_image_tokens, D]
    prompt = [1, IMG, IMG, IMG, 2, IMG, IMG, 3]
    req = Request.create("r", prompt, SamplingParams(), image_token_id=IMG, image_embeds=embeds)
    sched.add(Sequence(req, block_size=4))
    first = sched.schedule()
    assert first is not None and first.image_token_indices == [1, 2, 3]
    assert first.image_embeds is not None
    torch.testing.assert_close(first.image_embeds, embeds[:3])
    sched.update(first.batch_id, [])
    second = sched.schedule()
    assert second is not None and second.image_token_indices == [1, 2]
    assert second.image_embeds is not None
    torch.testing.assert_close(second.image_embeds, embeds[3:])
    sched.update(second.batch_id, [0])


def test_same_image_shares_blocks_other_image_does_not(make_scheduler: MakeScheduler) -> None:
    sched = make_scheduler()
    prompt = [1, IMG, IMG, IMG, IMG, IMG, IMG, IMG, IMG, 2]

    def add(rid: str, image_hash: str) -> Sequence:
        embeds = torch.zeros(8, 2)  # [num_image_tokens, D]
        req = Request.create(
            rid, prompt, SamplingParams(), image_token_id=IMG, image_embeds=embeds,
            image_hashes=[image_hash],
        )  # fmt: skip
        seq = Sequence(req, block_size=4)
        sched.add(seq)
        batch = sched.schedule()
        assert batch is not None
        sched.update(batch.batch_id, [0] * sum(batch.sample_flags))
        return seq

    first = add("a", "cat")
    same = add("b", "cat")
    other = add("c", "dog")
    assert same.num_cached_tokens == 8 and same.block_table[:2] == first.block_table[:2]
    assert other.num_cached_tokens == 0 and set(other.block_table).isdisjoint(first.block_table)


@pytest.mark.parametrize("run_ahead", [False, True])
@pytest.mark.parametrize("pp_size", [2, 4])
def test_pipeline_micro_batches_rebalance(
    make_scheduler: MakeScheduler, pp_size: int, run_ahead: bool
) -> None:
    """pp_size micro-batches in flight (twice that with run-ahead: each queued again on its
    in-flight samples): after prefills of unequal length, and again after some sequences
    finish, steady decode micro-batches differ by at most one sequence; nobody starves (every
    live sequence decodes once per round)."""
    sched = make_scheduler(num_blocks=200, block_size=4, pp_size=pp_size, async_decode=run_ahead)
    max_in_flight = 2 * pp_size if run_ahead else pp_size
    seqs = [_seq(f"s{i}", list(range(1, 2 + 7 * (i % 3))), max_tokens=50) for i in range(13)]
    for seq in seqs:
        sched.add(seq)
    in_flight: list = []

    def round_sizes(num_rounds: int) -> list[int]:
        sizes: list[int] = []
        for _ in range(num_rounds * pp_size):
            while len(in_flight) < max_in_flight and (batch := sched.schedule()) is not None:
                assert all(s <= batch.batch_id - pp_size for s in batch.deferred_source_batch_ids)
                in_flight.append(batch)
            done = in_flight.pop(0)
            sched.update(done.batch_id, [7] * sum(done.sample_flags))
            sizes.append(done.num_seqs)
        return sizes[-pp_size:]

    # Rounds to settle: with run-ahead only a micro-batch's tail moves to the next one.
    settle, resettle = (12, 8) if run_ahead else (5, 3)
    round_sizes(settle)
    before = [s.num_output_tokens for s in sched.running]
    sizes = round_sizes(1)
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 13, sizes
    assert [s.num_output_tokens - b for s, b in zip(sched.running, before, strict=True)] == [1] * 13
    for seq in seqs[:5]:  # finished from one end: the micro-batches rebalance
        sched.finish(seq, SequenceStatus.FINISHED_STOPPED)
    round_sizes(resettle)
    sizes = round_sizes(1)
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 8, sizes
    for batch in in_flight:
        sched.update(batch.batch_id, [7] * sum(batch.sample_flags))
