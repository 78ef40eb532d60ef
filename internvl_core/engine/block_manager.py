"""Paged KV block bookkeeping: block ids, ref counts, an LRU free list and prefix caching.

Pure Python (no torch): in come block counts and hash chains of full blocks, out go block ids.
The KV tensors themselves live in `kv_cache.py`; this module only decides which ids are used.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence

# A block hash: 16 bytes of blake2b over (parent hash, token ids, extra keys).
BlockHash = bytes

_ROOT = b"\x00" * 16


def hash_block(
    parent: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: Iterable[str] = (),
) -> BlockHash:
    """Hash one full block, chained on the hash of the block before it.

    `extra_keys` carries what token ids alone do not say, e.g. the content hash of every image
    whose `<IMG_CONTEXT>` rows fall in this block (all image tokens share one id).
    """
    digest = hashlib.blake2b(parent if parent is not None else _ROOT, digest_size=16)
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    for key in extra_keys:
        encoded = key.encode()
        digest.update(struct.pack("<q", len(encoded)))
        digest.update(encoded)
    return digest.digest()


class BlockManager:
    """Owns `num_blocks` KV block ids of `block_size` tokens each.

    A block is in use (ref count >= 1) or free. Free blocks sit in one LRU queue; a free block may
    still hold a cached full block (it has a hash) and can be revived by a prefix hit until it is
    evicted, which happens when it reaches the front of the queue and is allocated anew. Blocks
    without a hash are queued at the front so they are reused before any cached content.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        assert num_blocks >= 1 and block_size >= 1
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        # Insertion order = eviction order (front evicted first); values unused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_queried_blocks = 0
        self.num_hit_blocks = 0

    # ---- queries --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, cached ones included (they can be evicted on demand)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._hashes[block_id]

    def free_block_ids(self) -> list[int]:
        """Free ids in eviction order (front first); for tests and debugging."""
        return list(self._free)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def lookup(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """Block ids of the longest prefix of `block_hashes` that is cached (no side effects)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for block_hash in block_hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def num_free_needed(self, hit_block_ids: Sequence[int], num_new_blocks: int) -> int:
        """Free blocks consumed by reviving `hit_block_ids` and allocating `num_new_blocks`."""
        revived = sum(1 for b in hit_block_ids if self._ref_counts[b] == 0)
        return revived + num_new_blocks

    def can_allocate(self, num_new_blocks: int, hit_block_ids: Sequence[int] = ()) -> bool:
        return self.num_free_needed(hit_block_ids, num_new_blocks) <= len(self._free)

    # ---- mutations ------------------------------------------------------------------------
    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks found by `lookup` (reviving free ones)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def record_lookup(self, num_queried: int, num_hits: int) -> None:
        """Count a prefix lookup for the hit-rate statistic."""
        self.num_queried_blocks += num_queried
        self.num_hit_blocks += num_hits

    def allocate(self, num_new_blocks: int) -> list[int]:
        """Take `num_new_blocks` blocks from the front of the free queue (evicting cached ones)."""
        if num_new_blocks > len(self._free):
            raise RuntimeError(
                f"block manager asked for {num_new_blocks} blocks; {len(self._free)} are free"
            )
        block_ids: list[int] = []
        for _ in range(num_new_blocks):
            block_id, _ = self._free.popitem(last=False)
            old_hash = self._hashes[block_id]
            if old_hash is not None:
                del self._cached[old_hash]
                self._hashes[block_id] = None
            assert self._ref_counts[block_id] == 0
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block; a block reaching 0 joins the free queue.

        Tail blocks are released first so that, among cached blocks, the end of a chain is
        evicted before its beginning (a shared prefix outlives the suffixes hanging off it).
        """
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            assert count >= 1, f"block {block_id} freed with ref count {count}"
            self._ref_counts[block_id] = count - 1
            if count > 1:
                continue
            self._free[block_id] = None
            if self._hashes[block_id] is None:
                self._free.move_to_end(block_id, last=False)

    def register(self, block_id: int, block_hash: BlockHash) -> None:
        """Mark a fully computed block as reusable under `block_hash`.

        If another block already holds that content the first one stays the cached copy.
        """
        if not self.enable_prefix_caching or self._hashes[block_id] is not None:
            return
        assert self._ref_counts[block_id] >= 1, "only blocks in use are registered"
        if block_hash in self._cached:
            return
        self._cached[block_hash] = block_id
        self._hashes[block_id] = block_hash

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks in use keep their contents)."""
        self._cached.clear()
        self._hashes = [None] * self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        if self.num_queried_blocks == 0:
            return 0.0
        return self.num_hit_blocks / self.num_queried_blocks
