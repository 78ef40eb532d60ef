"""Block manager: exact block ids, ref counts, free counts, LRU eviction and prefix hits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from internvl_core.engine.block_manager import BlockManager, hash_block


@pytest.fixture
def manager() -> Iterator[BlockManager]:
    bm = BlockManager(8, 4)
    yield bm
    assert bm.num_free_blocks == bm.num_blocks, "leaked blocks"
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


def _chain(blocks: list[list[int]], extra: list[tuple[str, ...]] | None = None) -> list[bytes]:
    hashes: list[bytes] = []
    for i, tokens in enumerate(blocks):
        keys = extra[i] if extra else ()
        hashes.append(hash_block(hashes[-1] if hashes else None, tokens, keys))
    return hashes


def test_hash_is_chained_and_keyed() -> None:
    a = _chain([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = _chain([[9, 2, 3, 4], [5, 6, 7, 8]])
    assert a[0] != b[0] and a[1] != b[1], "same tokens after a different prefix must differ"
    assert _chain([[1, 2, 3, 4], [5, 6, 7, 8]]) == a, "deterministic"
    img_a = hash_block(None, [7, 7, 7, 7], ("image-a",))
    img_b = hash_block(None, [7, 7, 7, 7], ("image-b",))
    assert img_a != img_b != hash_block(None, [7, 7, 7, 7])
    assert hash_block(None, [1], ("ab", "c")) != hash_block(None, [1], ("a", "bc"))


def test_allocate_and_free_ids(manager: BlockManager) -> None:
    first = manager.allocate(3)
    assert first == [0, 1, 2]
    second = manager.allocate(2)
    assert second == [3, 4]
    assert manager.num_free_blocks == 3
    assert [manager.ref_count(b) for b in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]
    manager.free(first)
    # Uncached blocks go to the front, in ascending order, so they are reused first.
    assert manager.free_block_ids() == [0, 1, 2, 5, 6, 7]
    assert manager.allocate(2) == [0, 1]
    manager.free([0, 1])
    manager.free(second)
    with pytest.raises(RuntimeError, match="9 blocks"):
        manager.allocate(9)


def test_prefix_hit_shares_blocks_and_ref_counts(manager: BlockManager) -> None:
    hashes = _chain([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    table_a = manager.allocate(3)
    for block_id, block_hash in zip(table_a, hashes, strict=True):
        manager.register(block_id, block_hash)
    assert manager.num_cached_blocks == 3
    # Same first two blocks, different third one.
    other = _chain([[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]])
    hits = manager.lookup(other)
    assert hits == [0, 1]
    manager.acquire(hits)
    table_b = hits + manager.allocate(1)
    assert table_b == [0, 1, 3]
    assert [manager.ref_count(b) for b in range(4)] == [2, 2, 1, 1]
    manager.free(table_a)
    assert [manager.ref_count(b) for b in range(4)] == [1, 1, 0, 1]
    # Block 2 is free but still cached: a later lookup revives it.
    assert manager.free_block_ids() == [4, 5, 6, 7, 2]
    assert manager.lookup(hashes) == [0, 1, 2]
    manager.free(table_b)
    assert manager.num_free_blocks == 8


def test_free_cached_blocks_are_revived_and_evicted_lru(manager: BlockManager) -> None:
    hashes = _chain([[1, 1, 1, 1], [2, 2, 2, 2]])
    table = manager.allocate(2)
    manager.register(table[0], hashes[0])
    manager.register(table[1], hashes[1])
    manager.free(table)
    # Cached blocks queue at the back, tail of the chain first.
    assert manager.free_block_ids() == [2, 3, 4, 5, 6, 7, 1, 0]
    hits = manager.lookup(hashes)
    assert hits == [0, 1]
    assert manager.can_allocate(6, hits)
    assert not manager.can_allocate(7, hits)
    assert manager.num_free_needed(hits, 1) == 3
    manager.acquire(hits)
    assert manager.num_free_blocks == 6
    manager.free(hits)
    # Allocating everything evicts the cached blocks, chain tail first.
    every = manager.allocate(8)
    assert every == [2, 3, 4, 5, 6, 7, 1, 0]
    assert manager.num_cached_blocks == 0
    assert manager.lookup(hashes) == []
    manager.free(every)


def test_duplicate_content_keeps_first_copy(manager: BlockManager) -> None:
    (block_hash,) = _chain([[3, 3, 3, 3]])
    a, b = manager.allocate(2)
    manager.register(a, block_hash)
    manager.register(b, block_hash)
    assert manager.block_hash(a) == block_hash and manager.block_hash(b) is None
    manager.free([a, b])
    # b was uncached: front of the queue; a cached: back.
    assert manager.free_block_ids()[0] == b and manager.free_block_ids()[-1] == a


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    hashes = _chain([[1, 2]])
    (block,) = bm.allocate(1)
    bm.register(block, hashes[0])
    assert bm.lookup(hashes) == []
    bm.free([block])
    assert bm.num_free_blocks == 4


def test_hit_rate_and_reset(manager: BlockManager) -> None:
    hashes = _chain([[1, 2, 3, 4]])
    (block,) = manager.allocate(1)
    manager.register(block, hashes[0])
    manager.record_lookup(2, 1)
    assert manager.prefix_cache_hit_rate == 0.5
    manager.reset_prefix_cache()
    assert manager.lookup(hashes) == []
    manager.free([block])
    assert manager.num_blocks_for(0) == 0 and manager.num_blocks_for(5) == 2


def test_double_free_is_an_invariant_error(manager: BlockManager) -> None:
    (block,) = manager.allocate(1)
    manager.free([block])
    with pytest.raises(AssertionError):
        manager.free([block])
