"""The scheduler -> stage contract: `ScheduledBatch` (plain data), `ModelInput`, `StageOutput`.

A ScheduledBatch is all a stage worker ever receives from the scheduler (in process or over Ray);
each stage turns it into `ModelInput` tensors on its own device and answers with a `StageOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from internvl_core.config import SamplingParams
from internvl_core.engine.sampler import SamplerOutput, is_plain_greedy
from internvl_core.model.attention_metadata import AttentionMetadata


@dataclass(slots=True)
class SamplingRequest:
    """What the last stage needs to sample one sequence's next token."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: tuple[int, ...]
    # The argmax of the raw logits is the token (no warping, penalties, logprobs or grammar):
    # decided once per request, so a step reads one flag per row.
    plain_greedy: bool = field(init=False)

    def __post_init__(self) -> None:
        self.plain_greedy = is_plain_greedy(self.params) and self.params.structured_output is None


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work. Sequence s owns flattened token rows [sum(query_lens[:s]), +query_lens[s]).

    Its new tokens sit at positions [context_lens[s], context_lens[s] + query_lens[s]); it samples
    one token when `sample_flags[s]` (its chunk reaches the end of its known tokens).
    """

    batch_id: int
    request_ids: list[str]
    input_token_ids: list[int]  # [num_tokens] flattened new tokens
    query_lens: list[int]  # [num_seqs]
    context_lens: list[int]  # [num_seqs] tokens already in the KV cache
    prompt_lens: list[int]  # [num_seqs] Phi-3 long RoPE reference length while prefilling
    block_tables: list[list[int]]  # [num_seqs][blocks]
    sample_flags: list[bool]  # [num_seqs]
    sampling: list[SamplingRequest]  # one per True in sample_flags, same order
    block_size: int
    image_embeds: torch.Tensor | None = None  # [num_image_rows, D] rows spliced in this batch
    image_token_indices: list[int] = field(default_factory=list)  # [num_image_rows] token rows
    # Requests gone since the previous batch: stages drop their per-request state (generators).
    finished_request_ids: list[str] = field(default_factory=list)
    # Run-ahead decoding: token rows whose id is still on the device, sampled by earlier batches
    # still in flight (`deferred_source_batch_ids`, in submission order); `deferred_sample_rows`
    # index their samples concatenated in that order. `input_token_ids` holds 0 there. Stage 0
    # receives those batches' last-stage outputs along with this batch.
    deferred_token_rows: list[int] = field(default_factory=list)  # [num_deferred]
    deferred_sample_rows: list[int] = field(default_factory=list)  # [num_deferred]
    deferred_source_batch_ids: list[int] = field(default_factory=list)  # [num_sources]

    @classmethod
    def greedy_decode(
        cls,
        batch_id: int,
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        *,
        request_prefix: str = "decode",
        token_id: int = 0,
    ) -> ScheduledBatch:
        """A decode step of one `token_id` per sequence after `context_lens` cached tokens, each
        sampled greedily (profiling and benchmarks)."""
        num_seqs = len(context_lens)
        greedy = SamplingRequest(request_prefix, SamplingParams(), [], [], ())
        return cls(
            batch_id=batch_id,
            request_ids=[f"{request_prefix}-{i}" for i in range(num_seqs)],
            input_token_ids=[token_id] * num_seqs,
            query_lens=[1] * num_seqs,
            context_lens=list(context_lens),
            prompt_lens=[c + 1 for c in context_lens],
            block_tables=block_tables,
            sample_flags=[True] * num_seqs,
            sampling=[greedy] * num_seqs,
            block_size=block_size,
        )

    @property
    def num_seqs(self) -> int:
        return len(self.request_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.input_token_ids)

    @property
    def is_decode_only(self) -> bool:
        return len(self.input_token_ids) == len(self.request_ids)


@dataclass(slots=True)
class ModelInput:
    """Tensors one stage builds from a ScheduledBatch (on its own device)."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn: AttentionMetadata
    sample_indices: torch.Tensor  # [num_samples] int64 token rows whose logits are sampled


@dataclass(slots=True)
class StageOutput:
    """Hidden states for the next stage, or (last stage) the sampled tokens; never logits."""

    batch_id: int
    hidden_states: torch.Tensor | None = None  # [num_tokens, D]
    sampled: SamplerOutput | None = None
