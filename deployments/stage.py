"""Pipeline stages as Ray actors pinned to the LLM replica's placement-group bundles (bundle i =
stage i), behind the engine's StageWorker protocol.

In: ScheduledBatches from the replica's engine and the previous stage's output by reference (an
ObjectRef, so hidden states go stage to stage without visiting the replica). Out: StageOutput.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.device import resolve_device
from internvl_core.config import EngineConfig
from internvl_core.engine import LLMEngine, ModelRunner, StructuredOutputs
from internvl_core.engine.batch import ScheduledBatch, StageOutput
from internvl_core.grounding import GROUNDING_TOKENS
from internvl_core.model.decoder import DecoderModel
from internvl_core.serve_args import ServeArgs

logger = logging.getLogger(__name__)

STAGE_PING_TIMEOUT_S = 5.0


class StageActor:
    """Owns decoder layers [start, end) and their KV blocks; loads only its own tensors."""

    def __init__(self, args: ServeArgs, start_layer: int, end_layer: int) -> None:
        device, dtype = resolve_device(args.dtype)
        model = DecoderModel.from_checkpoint(
            args.model_path,
            start_layer=start_layer,
            end_layer=end_layer,
            dtype=dtype,
            device=device,
            quantization=args.quantization,
        )
        # The last stage samples, so it holds the grammar matchers of structured outputs.
        structured = StructuredOutputs.from_checkpoint(
            args.model_path, vocab_size=model.arch.vocab_size
        )
        self.runner = ModelRunner(model, block_size=args.engine.block_size, structured=structured)
        self.layers = (start_layer, end_layer)
        logger.info("stage for layers [%d, %d) ready on %s", start_layer, end_layer, device)

    def plan_kv_blocks(self, config: EngineConfig) -> int:
        return self.runner.plan_kv_blocks(config)

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def execute(self, batch: ScheduledBatch, prev: StageOutput | None) -> StageOutput:
        hidden = prev.hidden_states if prev is not None else None
        return self.runner.execute(batch, hidden)

    def ping(self) -> tuple[int, int]:
        return self.layers


class RayStageWorker:
    """StageWorker over a StageActor: submit chains ObjectRefs, fetch blocks on the last one.

    An actor runs one caller's calls in submission order, which the pipeline relies on.
    """

    def __init__(self, actor: Any, *, first: bool) -> None:
        self.actor = actor
        self.first = first

    def plan_kv_blocks(self, config: EngineConfig) -> int:
        return ray.get(self.actor.plan_kv_blocks.remote(config))

    def init_kv_cache(self, num_blocks: int) -> None:
        ray.get(self.actor.init_kv_cache.remote(num_blocks))

    def submit(self, batch: ScheduledBatch, prev: Any) -> Any:
        if not self.first and batch.image_embeds is not None:
            # Only stage 0 splices images: later stages need not receive the (large) rows.
            batch = dataclasses.replace(batch, image_embeds=None, image_token_indices=[])
        return self.actor.execute.remote(batch, prev)

    def fetch(self, handle: Any) -> StageOutput:
        return ray.get(handle)

    def ping(self) -> None:
        """Raises (ActorDiedError, GetTimeoutError) when the stage is gone or stuck."""
        ray.get(self.actor.ping.remote(), timeout=STAGE_PING_TIMEOUT_S)


def kept_tokens(args: ServeArgs) -> tuple[str, ...]:
    """Special tokens the served text keeps (grounding tags, like the original demo)."""
    return GROUNDING_TOKENS if args.keep_grounding_tokens else ()


def build_pipeline_engine(args: ServeArgs, *, dtype: Any) -> tuple[LLMEngine, list[RayStageWorker]]:
    """The replica's engine with one StageActor per bundle of its placement group.

    Without a placement group (local testing) the actors are placed by Ray freely. Stages are
    never restarted alone (`max_restarts=0`): a lost stage loses its KV cache, so the replica
    fails its health check and Serve replaces it whole.
    """
    del dtype  # each stage resolves its own device and dtype from args
    pg = get_current_placement_group()
    remote_cls = ray.remote(StageActor)
    workers: list[RayStageWorker] = []

    def make_stage(index: int, lo: int, hi: int) -> RayStageWorker:
        options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "max_concurrency": 1}
        if pg is not None:
            bundle = pg.bundle_specs[index]
            options["num_gpus"] = bundle.get("GPU", 0)
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=index
            )
        worker = RayStageWorker(
            remote_cls.options(**options).remote(args, lo, hi), first=index == 0
        )
        workers.append(worker)
        return worker

    engine = LLMEngine.from_checkpoint(
        args.model_path,
        args.engine,
        quantization=args.quantization,
        stage_factory=make_stage,
        keep_special_tokens=kept_tokens(args),
    )
    return engine, workers
