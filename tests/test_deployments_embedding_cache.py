"""EmbeddingCache: LRU bounded by the bytes held, not by the number of entries."""

from __future__ import annotations

import pytest
import torch

from deployments.embedding_cache import EmbeddingCache, held_bytes

ROW = 64 * 4  # bytes of one fp32 row of width 64


def _rows(num_rows: int) -> torch.Tensor:
    return torch.zeros(num_rows, 64)  # [num_rows, 64] fp32


def test_evicts_least_recently_used_by_bytes() -> None:
    cache = EmbeddingCache(max_bytes=10 * ROW)
    cache.put("a", _rows(4))
    cache.put("b", _rows(4))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", _rows(4))  # 12 rows > 10: b (least recent) goes
    assert ("a" in cache, "b" in cache, "c" in cache) == (True, False, True)
    assert cache.num_bytes == 8 * ROW
    cache.put("big", _rows(9))  # needs 9 of 10: both a and c go
    assert (len(cache), cache.num_bytes) == (1, 9 * ROW)


def test_one_large_entry_counts_as_many_small_ones() -> None:
    """The entry bound this replaces kept 512 images whatever their size; bytes do not."""
    cache = EmbeddingCache(max_bytes=41 * ROW)
    for k in range(41):
        cache.put(f"small{k}", _rows(1))
    assert len(cache) == 41
    cache.put("large", _rows(41))  # a 41-tile image's rows
    assert (len(cache), cache.num_bytes) == (1, 41 * ROW)


def test_entry_over_the_bound_is_not_kept_and_evicts_nothing() -> None:
    cache = EmbeddingCache(max_bytes=4 * ROW)
    cache.put("a", _rows(2))
    cache.put("huge", _rows(5))
    assert ("a" in cache, "huge" in cache, cache.num_bytes) == (True, False, 2 * ROW)


def test_zero_bytes_is_off() -> None:
    cache = EmbeddingCache(max_bytes=0)
    cache.put("a", _rows(1))
    assert (cache.get("a"), len(cache), cache.num_bytes) == (None, 0, 0)
    with pytest.raises(ValueError, match="max_bytes is -1"):
        EmbeddingCache(max_bytes=-1)


def test_replacing_a_key_counts_it_once() -> None:
    cache = EmbeddingCache(max_bytes=10 * ROW)
    cache.put("a", _rows(3))
    cache.put("a", _rows(5))
    assert (len(cache), cache.num_bytes) == (1, 5 * ROW)
    assert cache.get("a").shape == (5, 64)


def test_a_view_is_stored_compact() -> None:
    """Rows sliced from a batch output would keep the whole batch alive; the cache copies them."""
    batch = _rows(100)  # [100, 64]: a batch of several images
    view = batch[10:14]  # [4, 64]
    assert held_bytes(view) == 100 * ROW
    cache = EmbeddingCache(max_bytes=10 * ROW)
    cache.put("a", view)
    stored = cache.get("a")
    assert stored is not None and torch.equal(stored, view)
    assert held_bytes(stored) == cache.num_bytes == 4 * ROW
