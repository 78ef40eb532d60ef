"""Requests and sequences: image runs, embedding rows per chunk, hash chains, status machine."""

from __future__ import annotations

import pytest
import torch

from internvl_core.config import SamplingParams
from internvl_core.engine.sequence import Request, Sequence, SequenceStatus, find_runs
from internvl_core.errors import InvalidRequestError

IMG = 99


def _prompt() -> list[int]:
    # text, image A (3 tokens), text, image B (2 tokens), text
    return [1, 2, IMG, IMG, IMG, 3, 4, IMG, IMG, 5]


def test_find_runs() -> None:
    assert find_runs(_prompt(), IMG) == [(2, 5), (7, 9)]
    assert find_runs([IMG, IMG], IMG) == [(0, 2)]
    assert find_runs([1, 2], IMG) == []
    assert find_runs([IMG], None) == []


def test_request_validates_image_rows() -> None:
    params = SamplingParams(max_tokens=4)
    embeds = torch.randn(5, 8)  # [num_image_tokens, D]
    req = Request.create("r", _prompt(), params, image_token_id=IMG, image_embeds=embeds,
                         image_hashes=["a", "b"])  # fmt: skip
    assert [(r.start, r.end, r.row_start, r.content_hash) for r in req.image_runs] == [
        (2, 5, 0, "a"),
        (7, 9, 3, "b"),
    ]
    with pytest.raises(InvalidRequestError, match="5 <IMG_CONTEXT> tokens but image_embeds has 4"):
        Request.create("r", _prompt(), params, image_token_id=IMG, image_embeds=embeds[:4])
    with pytest.raises(InvalidRequestError, match="image_hashes has 1 entries"):
        Request.create(
            "r", _prompt(), params, image_token_id=IMG, image_embeds=embeds, image_hashes=["a"]
        )
    with pytest.raises(InvalidRequestError, match="prompt_token_ids is empty"):
        Request.create("r", [], params)


def test_missing_hashes_come_from_embedding_content() -> None:
    params = SamplingParams()
    embeds = torch.randn(5, 8)  # [num_image_tokens, D]
    a = Request.create("a", _prompt(), params, image_token_id=IMG, image_embeds=embeds)
    b = Request.create("b", _prompt(), params, image_token_id=IMG, image_embeds=embeds.clone())
    c = Request.create("c", _prompt(), params, image_token_id=IMG, image_embeds=embeds + 1)
    assert [r.content_hash for r in a.image_runs] == [r.content_hash for r in b.image_runs]
    assert a.image_runs[0].content_hash != c.image_runs[0].content_hash


def test_image_rows_for_chunks() -> None:
    embeds = torch.arange(5 * 2, dtype=torch.float32).reshape(5, 2)  # [num_image_tokens, D]
    req = Request.create("r", _prompt(), SamplingParams(), image_token_id=IMG, image_embeds=embeds)
    seq = Sequence(req, block_size=4)
    assert seq.image_rows(0, 10) == ([2, 3, 4, 7, 8], [0, 1, 2, 3, 4])
    assert seq.image_rows(0, 3) == ([2], [0])
    assert seq.image_rows(3, 8) == ([3, 4, 7], [1, 2, 3])
    assert seq.image_rows(5, 7) == ([], [])
    assert seq.image_rows(8, 10) == ([8], [4])
    assert seq.image_keys(0, 4) == (req.image_runs[0].content_hash,)
    assert seq.image_keys(4, 8) == tuple(r.content_hash for r in req.image_runs)
    assert seq.image_keys(9, 12) == ()


def test_block_hashes_depend_on_images_and_salt() -> None:
    embeds = torch.randn(5, 4)  # [num_image_tokens, D]
    params = SamplingParams()

    def seq(hashes: list[str], salt: str = "") -> Sequence:
        req = Request.create(
            "r", _prompt(), params, image_token_id=IMG, image_embeds=embeds, image_hashes=hashes
        )
        return Sequence(req, block_size=4, hash_salt=salt)

    same = seq(["a", "b"]).full_block_hashes(2)
    assert seq(["a", "b"]).full_block_hashes(2) == same
    other_b = seq(["a", "c"]).full_block_hashes(2)
    assert other_b[0] == same[0] and other_b[1] != same[1]
    assert seq(["x", "b"]).full_block_hashes(1) != same[:1]
    assert seq(["a", "b"], salt="long").full_block_hashes(1) != same[:1]
    plain = Sequence(Request.create("p", [1, 2, 3, 4, 5], params), block_size=4)
    assert len(plain.full_block_hashes(1)) == 1
    with pytest.raises(AssertionError):
        plain.full_block_hashes(2)


def test_sequence_state() -> None:
    seq = Sequence(Request.create("r", [1, 2, 3], SamplingParams()), block_size=2)
    assert seq.status is SequenceStatus.WAITING and seq.is_prefilling
    seq.num_computed_tokens = 3
    seq.append_token(7)
    assert seq.output_token_ids == [7] and seq.num_output_tokens == 1 and not seq.is_prefilling
    seq.block_table = [4, 5]
    seq.reset_for_recompute()
    assert seq.status is SequenceStatus.PREEMPTED and seq.block_table == []
    assert seq.num_computed_tokens == 0 and seq.token_ids == [1, 2, 3, 7]
    assert SequenceStatus.FINISHED_LENGTH.finish_reason == "length"
    assert SequenceStatus.RUNNING.finish_reason is None
    assert SequenceStatus.from_finish_reason("abort") is SequenceStatus.FINISHED_ABORTED
    assert SequenceStatus.FINISHED_ERROR.is_finished and not SequenceStatus.PREEMPTED.is_finished
