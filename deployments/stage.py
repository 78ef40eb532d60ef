"""Pipeline stages as Ray actors pinned to the LLM replica's placement-group bundles (bundle i =
stage i), behind the engine's StageWorker protocol.

In: ScheduledBatches from the replica's engine (each stage gets only the fields it reads). Hidden
states go stage to stage without visiting the replica: by torch.distributed P2P between the actors
(`pp_transport: p2p`, gloo on CPU, NCCL on CUDA) or as an ObjectRef through Ray's object store.
A run-ahead batch's input ids come to stage 0 as the last stage's ObjectRefs of the batches that
sampled them (a few ints each), so they never wait for the replica to read them.
Out: StageOutput.
Health pings run on their own thread, so a long step never makes a busy stage look dead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Sequence
from typing import Any

import ray
import torch
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.device import resolve_device
from internvl_core.config import EngineConfig
from internvl_core.engine import LLMEngine, ModelRunner, StructuredOutputs
from internvl_core.engine.batch import ScheduledBatch, StageOutput
from internvl_core.engine.compiled_decode import CompiledDecode
from internvl_core.engine.stage_transport import P2PTransport
from internvl_core.grounding import GROUNDING_TOKENS
from internvl_core.model.decoder import DecoderModel
from internvl_core.serve_args import ServeArgs

logger = logging.getLogger(__name__)

STAGE_PING_TIMEOUT_S = 5.0
# Steps (execute, KV set-up) run one at a time in submission order on the default thread; pings
# run on a thread of their own and answer while a step is in flight (ray-serve-notes sec. 5).
HEALTH_GROUP = "health"


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
        self.runner = ModelRunner(
            model,
            block_size=args.engine.block_size,
            structured=structured,
            compiled_decode=CompiledDecode.from_config(model, args.engine),
        )
        self.layers = (start_layer, end_layer)
        self.transport: P2PTransport | None = None
        logger.info("stage for layers [%d, %d) ready on %s", start_layer, end_layer, device)

    def plan_kv_blocks(self, config: EngineConfig) -> int:
        return self.runner.plan_kv_blocks(config)

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    # ---- stage-to-stage transport ---------------------------------------------------------
    def p2p_address(self) -> str:
        """A rendezvous address on this node (called on stage 0)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def link(self, init_method: str, rank: int, world_size: int) -> None:
        """Join the stages' process group; from now on hidden states go by P2P."""
        self.transport = P2PTransport(
            rank=rank, world_size=world_size, init_method=init_method, device=self.runner.device
        )

    def execute(
        self, batch: ScheduledBatch, upstream: list[Any], sources: list[Any] | None = None
    ) -> StageOutput:
        """Run the owned layers. Linked: receive from / send to the neighbour stages (`upstream`
        is []); else `upstream` is [] on stage 0 and [the previous stage's ObjectRef] after it.
        `sources` (stage 0): the last stage's ObjectRefs of `batch.deferred_source_batch_ids`.

        The refs come nested so that Ray starts the call at once and it waits here, on the step
        thread: a top-level ref would hold the actor's ordered queue, pings included, until the
        previous stage finished.
        """
        if self.transport is None:
            prev: StageOutput | None = ray.get(upstream[0]) if upstream else None
            hidden = prev.hidden_states if prev is not None else None
            return self.runner.execute(batch, hidden, sources=ray.get(sources or []))
        model = self.runner.model
        try:
            hidden = None
            if not model.is_first_stage:
                hidden = self.transport.recv(
                    batch.num_tokens, model.arch.hidden_size, model.dtype
                )  # [T, D]
            output = self.runner.execute(batch, hidden, sources=ray.get(sources or []))
        except Exception:
            if not model.is_last_stage:
                # The next stage is blocked in recv: unblock it. The engine still fails the
                # step, since it collects this stage's error along with the last stage's output.
                self.transport.send(
                    torch.zeros(
                        (batch.num_tokens, model.arch.hidden_size),
                        dtype=model.dtype,
                        device=self.runner.device,
                    )  # [T, D]
                )
            raise
        if model.is_last_stage:
            return output
        assert output.hidden_states is not None
        self.transport.send(output.hidden_states)
        return StageOutput(output.batch_id)

    @ray.method(concurrency_group=HEALTH_GROUP)
    def ping(self) -> tuple[int, int]:
        """Liveness: answers while `execute` runs (its own thread; reads immutable state)."""
        return self.layers


class RayStageWorker:
    """StageWorker over a StageActor.

    Object store: submit chains ObjectRefs, fetch blocks on the last one. P2P: the handle is the
    list of every stage's ObjectRef so far (the hidden states go actor to actor), and fetch
    raises the first stage error among them. An actor runs one caller's calls in submission
    order, which the pipeline (and the P2P send/recv pairing) relies on. Either way the last
    stage's ObjectRef of a source batch goes to stage 0 for a run-ahead batch.
    """

    def __init__(self, actor: Any, *, first: bool, last: bool = False, p2p: bool = False) -> None:
        self.actor = actor
        self.first = first
        self.last = last
        self.p2p = p2p

    def plan_kv_blocks(self, config: EngineConfig) -> int:
        return ray.get(self.actor.plan_kv_blocks.remote(config))

    def init_kv_cache(self, num_blocks: int) -> None:
        ray.get(self.actor.init_kv_cache.remote(num_blocks))

    def submit(self, batch: ScheduledBatch, prev: Any, sources: Sequence[Any] = ()) -> Any:
        batch = stage_view(batch, first=self.first, last=self.last)
        refs = [source[-1] if self.p2p else source for source in sources]  # last stage's
        if not self.p2p:
            return self.actor.execute.remote(batch, [] if prev is None else [prev], refs)
        return [*(prev or ()), self.actor.execute.remote(batch, [], refs)]

    def fetch(self, handle: Any) -> StageOutput:
        if not self.p2p:
            return ray.get(handle)
        pending = list(handle)
        while pending:  # an earlier stage's error first, as soon as it is known
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
        return ray.get(handle[-1])

    def ping(self) -> None:
        """Raises (ActorDiedError, GetTimeoutError) when the stage is gone or stuck."""
        ray.get(self.actor.ping.remote(), timeout=STAGE_PING_TIMEOUT_S)


def stage_view(batch: ScheduledBatch, *, first: bool, last: bool) -> ScheduledBatch:
    """The batch as one stage reads it: image rows only for stage 0 (it splices them), the
    per-request sampling state (token histories) only for the last stage (it samples)."""
    changes: dict[str, Any] = {}
    if not first and batch.image_embeds is not None:
        changes.update(image_embeds=None, image_token_indices=[])
    if not last and batch.sampling:
        changes["sampling"] = []
    return dataclasses.replace(batch, **changes) if changes else batch


def link_stages(workers: list[RayStageWorker]) -> None:
    """One process group over the stage actors (rank = stage index), for P2P hidden states."""
    init_method = ray.get(workers[0].actor.p2p_address.remote())
    ray.get(
        [w.actor.link.remote(init_method, rank, len(workers)) for rank, w in enumerate(workers)]
    )


async def ping_stages(stages: list[RayStageWorker]) -> None:
    """Ping every stage at once; raises ActorDiedError for a dead stage (Serve then replaces
    the replica at once) or TimeoutError past STAGE_PING_TIMEOUT_S. A busy stage answers."""
    if stages:
        pings = asyncio.gather(*(stage.actor.ping.remote() for stage in stages))
        await asyncio.wait_for(pings, timeout=STAGE_PING_TIMEOUT_S)


def stage_actor_options(pg: Any, index: int) -> dict[str, Any]:
    """Ray actor options of stage `index`: on bundle `index` of the replica's placement group
    (any node without one), never restarted alone, one step at a time (in order)."""
    options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "max_concurrency": 1}
    if pg is not None:
        options["num_gpus"] = pg.bundle_specs[index].get("GPU", 0)
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=index
        )
    return options


def remote_stage_class(actor_cls: type[StageActor] = StageActor) -> Any:
    """`actor_cls` as a Ray actor class with its health group (concurrency groups are fixed by
    `ray.remote`; `.options()` refuses them)."""
    return ray.remote(concurrency_groups={HEALTH_GROUP: 1})(actor_cls)


def kept_tokens(args: ServeArgs) -> tuple[str, ...]:
    """Special tokens the served text keeps (grounding tags, like the original demo)."""
    return GROUNDING_TOKENS if args.keep_grounding_tokens else ()


def build_pipeline_engine(
    args: ServeArgs, *, dtype: Any, actor_cls: type[StageActor] = StageActor
) -> tuple[LLMEngine, list[RayStageWorker]]:
    """The replica's engine with one `actor_cls` actor per bundle of its placement group.

    Without a placement group (local testing) the actors are placed by Ray freely. Stages are
    never restarted alone (`max_restarts=0`): a lost stage loses its KV cache, so the replica
    fails its health check and Serve replaces it whole.
    """
    del dtype  # each stage resolves its own device and dtype from args
    pg = get_current_placement_group()
    remote_cls = remote_stage_class(actor_cls)
    p2p = args.engine.pp_transport == "p2p"
    workers: list[RayStageWorker] = []

    def make_stage(index: int, lo: int, hi: int) -> RayStageWorker:
        options = stage_actor_options(pg, index)
        last = index == args.engine.pp_size - 1
        worker = RayStageWorker(
            remote_cls.options(**options).remote(args, lo, hi),
            first=index == 0,
            last=last,
            p2p=p2p,
        )
        workers.append(worker)
        if p2p and last:
            link_stages(workers)
        return worker

    engine = LLMEngine.from_checkpoint(
        args.model_path,
        args.engine,
        quantization=args.quantization,
        stage_factory=make_stage,
        keep_special_tokens=kept_tokens(args),
    )
    return engine, workers
