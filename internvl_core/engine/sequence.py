"""One generation request and its mutable decoding state (a Sequence) with its status machine.

In: prompt token ids, optional image embeddings (rows in `<IMG_CONTEXT>` order) with content
hashes, SamplingParams. Out: the token list, block table and full-block hash chain for the
scheduler.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import time
from dataclasses import dataclass, field

import torch

from internvl_core.config import SamplingParams
from internvl_core.engine.block_manager import BlockHash, hash_block
from internvl_core.errors import InvalidRequestError


class SequenceStatus(enum.Enum):
    """waiting -> running -> (preempted -> waiting again) ... -> one finished state."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style reason ("stop", "length", "abort", "error") or None while unfinished."""
        return self.value if self in _FINISHED else None

    @classmethod
    def from_finish_reason(cls, reason: str) -> SequenceStatus:
        status = cls(reason)
        assert status in _FINISHED, reason
        return status


_FINISHED = frozenset(
    {
        SequenceStatus.FINISHED_STOPPED,
        SequenceStatus.FINISHED_LENGTH,
        SequenceStatus.FINISHED_ABORTED,
        SequenceStatus.FINISHED_ERROR,
    }
)


@dataclass(slots=True, frozen=True)
class ImageRun:
    """A maximal run of `<IMG_CONTEXT>` tokens: prompt positions [start, end), embedding rows
    [row_start, row_start + end - start), and the image's content hash."""

    start: int
    end: int
    row_start: int
    content_hash: str


@dataclass(slots=True)
class Request:
    """What a client asked for; immutable after `create`."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    image_embeds: torch.Tensor | None = None  # [num_image_tokens, D]
    image_runs: list[ImageRun] = field(default_factory=list)
    # The template separator id(s): the original's only stop ids (params.ignore_eos disables them).
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = 0.0

    @classmethod
    def create(
        cls,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        image_token_id: int | None = None,
        image_embeds: torch.Tensor | None = None,
        image_hashes: list[str] | None = None,
        eos_token_ids: tuple[int, ...] = (),
    ) -> Request:
        """Check image rows against the `<IMG_CONTEXT>` runs of the prompt; build the request."""
        if not prompt_token_ids:
            raise InvalidRequestError("prompt_token_ids is empty; at least 1 token is required")
        runs: list[ImageRun] = []
        if image_embeds is not None:
            if image_embeds.dim() != 2:
                raise InvalidRequestError(
                    f"image_embeds has shape {tuple(image_embeds.shape)}; expected "
                    "[num_image_tokens, hidden]",
                    param="image_embeds",
                )
            spans = find_runs(prompt_token_ids, image_token_id)
            num_slots = sum(end - start for start, end in spans)
            if num_slots != image_embeds.shape[0]:
                raise InvalidRequestError(
                    f"prompt has {num_slots} <IMG_CONTEXT> tokens but image_embeds has "
                    f"{image_embeds.shape[0]} rows",
                    param="image_embeds",
                )
            runs = _image_runs(spans, image_embeds, image_hashes)
        elif image_hashes:
            raise InvalidRequestError(
                "image_hashes given without image_embeds", param="image_hashes"
            )
        return cls(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            image_embeds=image_embeds,
            image_runs=runs,
            eos_token_ids=eos_token_ids,
            arrival_time=time.monotonic(),
        )


def find_runs(token_ids: list[int], token_id: int | None) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of `token_id` in `token_ids`."""
    spans: list[tuple[int, int]] = []
    if token_id is None:
        return spans
    start = -1
    for pos, tok in enumerate(token_ids):
        if tok == token_id and start < 0:
            start = pos
        elif tok != token_id and start >= 0:
            spans.append((start, pos))
            start = -1
    if start >= 0:
        spans.append((start, len(token_ids)))
    return spans


def _image_runs(
    spans: list[tuple[int, int]], embeds: torch.Tensor, hashes: list[str] | None
) -> list[ImageRun]:
    if hashes is not None and len(hashes) != len(spans):
        raise InvalidRequestError(
            f"image_hashes has {len(hashes)} entries; the prompt has {len(spans)} image runs",
            param="image_hashes",
        )
    runs: list[ImageRun] = []
    row = 0
    for i, (start, end) in enumerate(spans):
        if hashes is not None:
            content = hashes[i]
        else:
            # No hash from the vision pool: hash the embedding bytes so equal images still share.
            rows = embeds[row : row + end - start].detach().contiguous().cpu()  # [run_len, D]
            content = hashlib.blake2b(rows.view(torch.uint8).numpy(), digest_size=16).hexdigest()
        runs.append(ImageRun(start=start, end=end, row_start=row, content_hash=content))
        row += end - start
    return runs


@dataclass(slots=True, eq=False)
class Sequence:
    """Decoding state of one request: tokens (prompt + output), KV progress and block table."""

    request: Request
    block_size: int
    # Mixed into the first block hash: what makes identical tokens give different KV (Phi-3's
    # long/short RoPE choice depends on the whole prompt's length).
    hash_salt: str = ""
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt + outputs
    output_token_ids: list[int] = field(default_factory=list)  # outputs only, kept in step
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)  # of full blocks, chained
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    admitted: bool = False
    first_scheduled_time: float | None = None  # monotonic; arrival to here is the queue time
    # Batches holding this sequence whose results have not come back, the new tokens they carry
    # and the tokens they will sample (known on the device only until the host reads them).
    num_in_flight: int = 0
    num_in_flight_tokens: int = 0
    num_pending_samples: int = 0
    # Where the newest in-flight sample sits: (batch id, row among that batch's samples).
    pending_sample: tuple[int, int] = (-1, -1)
    # The engine's TokenStops row while the request lives (-1 outside an engine).
    stop_row: int = -1
    # Output counts [from, until) at which a step may run on an in-flight sample (set by the
    # scheduler from the params; the empty range outside one).
    run_ahead_from: int = 0
    run_ahead_until: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def in_flight(self) -> bool:
        """Scheduled in a batch whose result has not come back."""
        return self.num_in_flight > 0

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens whose K/V are computed or being computed by in-flight batches."""
        return self.num_computed_tokens + self.num_in_flight_tokens

    @property
    def is_prefilling(self) -> bool:
        """True while more than the last token still lacks K/V (prompt or recompute)."""
        return self.num_tokens - self.num_computed_tokens > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)

    def image_keys(self, start: int, end: int) -> tuple[str, ...]:
        """Content hashes of the images with tokens in positions [start, end)."""
        return tuple(
            r.content_hash for r in self.request.image_runs if r.start < end and start < r.end
        )

    def full_block_hashes(self, num_blocks: int) -> list[BlockHash]:
        """Hashes of the first `num_blocks` full blocks, extending the cached chain as needed."""
        size = self.block_size
        assert num_blocks * size <= self.num_tokens
        while len(self.block_hashes) < num_blocks:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else None
            salt = (self.hash_salt,) if i == 0 and self.hash_salt else ()
            keys = salt + self.image_keys(i * size, (i + 1) * size)
            self.block_hashes.append(
                hash_block(parent, self.token_ids[i * size : (i + 1) * size], keys)
            )
        return self.block_hashes[:num_blocks]

    def image_rows(self, start: int, end: int) -> tuple[list[int], list[int]]:
        """For positions [start, end): (positions holding image tokens, their embedding rows)."""
        positions: list[int] = []
        rows: list[int] = []
        runs = self.request.image_runs
        first = bisect.bisect_right([r.end for r in runs], start)
        for run in runs[first:]:
            if run.start >= end:
                break
            lo, hi = max(start, run.start), min(end, run.end)
            positions.extend(range(lo, hi))
            rows.extend(range(run.row_start + lo - run.start, run.row_start + hi - run.start))
        return positions, rows

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop KV progress, keep tokens (outputs are re-prefilled)."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.status = SequenceStatus.PREEMPTED
        self.num_preemptions += 1
