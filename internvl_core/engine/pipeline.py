"""Pipeline of stage workers: a ScheduledBatch goes through stage 0 .. N-1; sampled tokens come out.

`StageWorker` is the small protocol between the engine and a stage: `LocalStageWorker` runs a
ModelRunner in process; a Ray actor stage (deployments/) implements the same four methods.
A run-ahead batch (its input tokens are samples of batches still in flight) also hands stage 0
those batches' last-stage handles, so the sampled ids go from the last stage to stage 0 without
waiting for the host to read them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from internvl_core.config import EngineConfig, LLMArchitecture
from internvl_core.engine.batch import ScheduledBatch, StageOutput
from internvl_core.engine.compiled_decode import CompiledDecode
from internvl_core.engine.model_runner import ModelRunner
from internvl_core.engine.sampler import SamplerOutput
from internvl_core.engine.structured import StructuredOutputs
from internvl_core.errors import InvalidRequestError
from internvl_core.model.decoder import DecoderModel

logger = logging.getLogger(__name__)


class StageWorker(Protocol):
    """One pipeline stage as the engine sees it.

    `submit` starts the stage on a batch and returns an opaque handle to its output; the next
    stage's `submit` receives that handle as `prev` (a Ray stage passes an ObjectRef through, so
    hidden states move stage to stage without visiting the engine). Stage 0 receives as `sources`
    the last stage's handles of `batch.deferred_source_batch_ids` (empty unless the batch runs
    ahead) and waits for them on its own side. A stage must run batches in submission order.
    `fetch` blocks for the StageOutput behind a handle of the last stage.
    """

    def plan_kv_blocks(self, config: EngineConfig) -> int: ...

    def init_kv_cache(self, num_blocks: int) -> None: ...

    def submit(self, batch: ScheduledBatch, prev: Any, sources: Sequence[Any] = ()) -> Any: ...

    def fetch(self, handle: Any) -> StageOutput: ...


class LocalStageWorker:
    """In-process stage: runs synchronously at submit; the handle is the StageOutput itself."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def plan_kv_blocks(self, config: EngineConfig) -> int:
        return self.runner.plan_kv_blocks(config)

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def submit(
        self,
        batch: ScheduledBatch,
        prev: StageOutput | None,
        sources: Sequence[StageOutput] = (),
    ) -> StageOutput:
        hidden = prev.hidden_states if prev is not None else None
        return self.runner.execute(batch, hidden, sources=sources)

    def fetch(self, handle: StageOutput) -> StageOutput:
        return handle


@dataclass(slots=True)
class PendingBatch:
    """A batch in flight through the pipeline."""

    batch: ScheduledBatch
    handle: Any


class Pipeline:
    """Chains stages; the engine keeps up to `pp_size` batches in flight through it."""

    def __init__(self, stages: Sequence[StageWorker]) -> None:
        assert stages, "a pipeline needs at least one stage"
        self.stages = list(stages)

    @property
    def pp_size(self) -> int:
        return len(self.stages)

    def init_kv_cache(self, config: EngineConfig) -> int:
        """Size every stage's pool to the smallest stage's capacity (block tables are shared)."""
        num_blocks = min(stage.plan_kv_blocks(config) for stage in self.stages)
        for stage in self.stages:
            stage.init_kv_cache(num_blocks)
        logger.info("pipeline of %d stage(s): %d KV blocks each", self.pp_size, num_blocks)
        return num_blocks

    def submit(self, batch: ScheduledBatch, sources: Sequence[PendingBatch] = ()) -> PendingBatch:
        """Start `batch` on every stage; `sources` are the in-flight batches whose samples its
        run-ahead rows take (`batch.deferred_source_batch_ids`, same order)."""
        first, *rest = self.stages
        handle = first.submit(batch, None, [source.handle for source in sources])
        for stage in rest:
            handle = stage.submit(batch, handle)
        return PendingBatch(batch, handle)

    def fetch(self, pending: PendingBatch) -> SamplerOutput:
        """Block until the batch leaves the last stage; returns its sampled tokens (an
        in-process stage leaves them on the device until the caller reads `token_ids`)."""
        output = self.stages[-1].fetch(pending.handle)
        assert output.batch_id == pending.batch.batch_id, "stages must keep submission order"
        assert output.sampled is not None, "the last stage samples"
        return output.sampled


def split_layers(num_layers: int, pp_size: int) -> list[tuple[int, int]]:
    """Even contiguous layer ranges [lo, hi), the first `num_layers % pp_size` one layer longer."""
    if not 1 <= pp_size <= num_layers:
        raise InvalidRequestError(
            f"pp_size is {pp_size}; it must be between 1 and num_hidden_layers ({num_layers})",
            param="pp_size",
        )
    base, extra = divmod(num_layers, pp_size)
    bounds = [0]
    for stage in range(pp_size):
        bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    return list(itertools.pairwise(bounds))


def build_pipeline(
    path: str | Path,
    config: EngineConfig,
    *,
    arch: LLMArchitecture,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantization: Literal["8bit", "4bit"] | None = None,
    stage_factory: Callable[[int, int, int], StageWorker] | None = None,
) -> Pipeline:
    """`config.pp_size` stages over even layer ranges. In-process stages (each loading only its
    own tensors) unless `stage_factory(stage_index, start_layer, end_layer)` builds them (the Serve
    replica passes one that creates Ray actors on its bundles)."""
    stages: list[StageWorker] = []
    for index, (lo, hi) in enumerate(split_layers(arch.num_hidden_layers, config.pp_size)):
        if stage_factory is not None:
            stages.append(stage_factory(index, lo, hi))
            continue
        model = DecoderModel.from_checkpoint(
            path,
            start_layer=lo,
            end_layer=hi,
            dtype=dtype,
            device=device,
            quantization=quantization,
            arch=arch,
        )
        structured = StructuredOutputs.from_checkpoint(path, vocab_size=arch.vocab_size)
        runner = ModelRunner(
            model,
            block_size=config.block_size,
            structured=structured,
            compiled_decode=CompiledDecode.from_config(model, config),
        )
        stages.append(LocalStageWorker(runner))
    return Pipeline(stages)
