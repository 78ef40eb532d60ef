"""The forward metadata of one batched step: where new K/V go and what each sequence attends to.

Built by the engine from a ScheduledBatch (or by the offline chat for one sequence) and passed
explicitly through every decoder `forward`; the model never reads globals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Flattened varlen batch: sequence s owns token rows [query_start[s], query_start[s+1]).

    KV cache per layer: a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]; a token's
    slot is `block_id * block_size + offset`. New tokens of a sequence are its last `query_len`
    tokens, so query row i of sequence s sits at position `seq_len - query_len + i` and attends
    causally to every cached token up to and including itself.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, destination slot of each new token's K/V
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int64, padded with 0
    query_lens: list[int]  # [num_seqs] new tokens per sequence in this step
    seq_lens: list[int]  # [num_seqs] tokens in context after this step (cached + new)
    block_size: int
    # Phi-3 longrope: per token, use the long factors (True) or the short ones (False).
    # The original picks per forward by max(position_ids)+1 > original_max_position_embeddings;
    # the engine decides it per sequence so batching never changes the choice. None = all short.
    long_rope_mask: torch.Tensor | None = None  # [num_tokens] bool
    # The same block tables as a host array, when the builder has one (saves a device copy back).
    host_block_tables: np.ndarray | None = None  # [num_seqs, max_num_blocks] int64

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @classmethod
    def for_contiguous(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        *,
        device: torch.device | str = "cpu",
        long_rope_mask: torch.Tensor | None = None,
    ) -> AttentionMetadata:
        """Build metadata from per-sequence block tables (plain ints)."""
        slots: list[int] = []
        for q_len, s_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
            for pos in range(s_len - q_len, s_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=1) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            block_tables=torch.tensor(padded, dtype=torch.long, device=device),
            query_lens=list(query_lens),
            seq_lens=list(seq_lens),
            block_size=block_size,
            long_rope_mask=long_rope_mask,
        )
