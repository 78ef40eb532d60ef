"""The vision pool's embedding cache: image content hash -> LLM-width rows, LRU bounded by bytes.

In: rows a replica has encoded (`[num_image_tokens, D_llm]`, on the CPU). Out: the same rows for a
later request with the same image. Entries differ in size by 40x (1 vs 41 tiles), so the bound
is the bytes held, not the count.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

logger = logging.getLogger(__name__)


def held_bytes(rows: torch.Tensor) -> int:
    """Bytes a tensor keeps alive: its whole storage (a view of a batch output holds the batch)."""
    return int(rows.untyped_storage().nbytes())


class EmbeddingCache:
    """LRU by bytes: `put` evicts the least recently used entries until the new one fits; an entry
    larger than the whole bound is not kept. `max_bytes` 0 turns the cache off."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes is {max_bytes}; must be >= 0")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        """The rows for `key` (now the most recently used), or None."""
        rows = self._entries.get(key)
        if rows is not None:
            self._entries.move_to_end(key)
        return rows

    def put(self, key: str, rows: torch.Tensor) -> None:
        """Keep `rows` under `key`, evicting from the least recently used end."""
        self._drop(key)
        if held_bytes(rows) > rows.nbytes:
            rows = rows.clone()  # [N, D]: a view would keep its whole batch output alive
        size = held_bytes(rows)
        if size > self.max_bytes:
            if self.max_bytes > 0:
                logger.debug("embedding of %d bytes is over cache_bytes %d", size, self.max_bytes)
            return
        while self.num_bytes + size > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
        self._entries[key] = rows
        self.num_bytes += size

    def _drop(self, key: str) -> None:
        rows = self._entries.pop(key, None)
        if rows is not None:
            self.num_bytes -= held_bytes(rows)
