"""`build_app(args: ServeArgs)`: the import_path of every YAML and of `serve run`.

In: YAML `args:` or `key=value` pairs, validated into ServeArgs (bad args fail at deploy time
naming the field). Out: the Serve application Ingress -> Preprocess -> VisionEncoder -> LLM, with
each stage's own replicas/autoscaling, and one GPU bundle per pipeline stage of an LLM replica.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import click
import ray
from ray import serve
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
from ray.serve import Application
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.config import BackpressureConfig

from deployments.auth import ApiKeyAuth
from deployments.ingress import IngressDeployment
from deployments.llm import LLMDeployment
from deployments.preprocess import PreprocessDeployment
from deployments.vision import VisionDeployment
from internvl_core.serve_args import AutoscalingOptions, DeploymentOptions, ServeArgs

logger = logging.getLogger(__name__)


def cluster_has_gpus(args: ServeArgs) -> bool:
    """Whether `num_gpus: auto` options take a GPU: `use_gpus` when set, else whether the Ray
    cluster has GPUs (never this machine's CUDA: a CPU-only head node may launch a GPU cluster).

    YAML deploys run the builder inside Serve's controller, connected already. `serve run
    deployments.app:build_app k=v` runs it *before* it connects to Ray, so connect here as it
    would (its --address / RAY_ADDRESS and runtime_env; no address: the cluster `ray start`
    recorded on this machine, else a new local one); the command then reuses the connection.
    """
    if args.use_gpus != "auto":
        return args.use_gpus
    if not ray.is_initialized():
        _connect_like_serve_run()
    return ray.cluster_resources().get("GPU", 0) > 0


def _connect_like_serve_run() -> None:
    """ray.init with the address and runtime_env of the `serve run` command calling us, if any."""
    ctx = click.get_current_context(silent=True)
    params = ctx.params if ctx is not None else {}
    address = params.get("address", os.environ.get("RAY_ADDRESS"))
    runtime_env = parse_runtime_env_args(
        runtime_env=params.get("runtime_env"),
        runtime_env_json=params.get("runtime_env_json"),
        working_dir=params.get("working_dir"),
    )
    logger.info("connecting to Ray (address %s) to see its GPUs", address or "auto-detected")
    ray.init(address=address, namespace=SERVE_NAMESPACE, runtime_env=runtime_env)


def _gpus(option: DeploymentOptions, has_gpus: bool) -> float:
    if option.num_gpus == "auto":
        return 1.0 if has_gpus else 0.0
    return float(option.num_gpus)


# Our policy name -> (Serve import path, the AutoscalingOptions targets it takes).
_POLICIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "queued_tiles": ("deployments.autoscaling:QueuedTilesPolicy", ("target_tiles_per_replica",)),
    "engine_queue": (
        "deployments.autoscaling:EngineQueuePolicy",
        ("target_waiting_per_replica", "target_kv_usage"),
    ),
}
_POLICY_FIELDS = {
    "policy",
    "target_tiles_per_replica",
    "target_waiting_per_replica",
    "target_kv_usage",
}


def autoscaling_config(options: AutoscalingOptions) -> dict[str, Any]:
    """Serve's `autoscaling_config`: our bounds/delays/windows, plus a custom `policy`
    (class import path and constructor kwargs) unless Serve's default is asked for."""
    out = options.model_dump(exclude=_POLICY_FIELDS)
    if options.policy != "ongoing_requests":
        path, fields = _POLICIES[options.policy]
        kwargs = {name: getattr(options, name) for name in fields}
        out["policy"] = {"policy_function": path, "policy_kwargs": kwargs}
    return out


def deployment_options(option: DeploymentOptions, name: str, *, num_gpus: float) -> dict[str, Any]:
    """Serve `.options()` kwargs from our typed DeploymentOptions."""
    out: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": option.max_ongoing_requests,
        "max_queued_requests": option.max_queued_requests,
        "health_check_period_s": option.health_check_period_s,
        "health_check_timeout_s": option.health_check_timeout_s,
        "graceful_shutdown_timeout_s": option.graceful_shutdown_timeout_s,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=1),
        "ray_actor_options": {"num_cpus": option.num_cpus, "num_gpus": num_gpus},
    }
    if option.autoscaling is not None:
        out["autoscaling_config"] = autoscaling_config(option.autoscaling)
        out["num_replicas"] = "auto"
    else:
        out["num_replicas"] = option.num_replicas
    return out


def llm_options(args: ServeArgs, has_gpus: bool) -> dict[str, Any]:
    """PP=1: the replica holds its GPU. PP>1: one bundle per stage, the replica in bundle 0
    (CPU only; stage actors take the GPUs).

    PACK keeps the stages on one node when it has the GPUs (fast links) and spans nodes when
    none has: pipeline stages only pass hidden states, and STRICT_PACK would leave a replica
    that needs more GPUs than any single node holds pending forever.
    """
    gpus = _gpus(args.llm, has_gpus)
    out = deployment_options(args.llm, "LLM", num_gpus=gpus)
    pp = args.engine.pp_size
    if pp > 1:
        per_stage = {"GPU": gpus} if gpus > 0 else {"CPU": 0.01}
        out["ray_actor_options"] = {"num_cpus": args.llm.num_cpus, "num_gpus": 0}
        out["placement_group_bundles"] = [{"CPU": args.llm.num_cpus, **per_stage}] + [
            dict(per_stage) for _ in range(pp - 1)
        ]
        out["placement_group_strategy"] = "PACK"
    return out


# The ingress already holds each request body; Ray puts call arguments over 100 KB (a data: URL
# image) into the object store, a round trip through the raylet for bytes the Preprocess replica
# could have had in the call itself. Only this process inlines up to 1 MB: replies of the other
# stages (pixel tiles, embeddings) keep Ray's default, so their arrays go replica to replica
# through the object store and never through the ingress. Measured with
# `benchmarks/serve.py --image-share 1`: per image request, plumbing 26.0 -> 22.3 core-ms,
# the real graph 43.8 -> 36.3.
INGRESS_RAY_ENV = {"RAY_max_direct_call_object_size": str(2**20)}


def build_app(args: ServeArgs) -> Application:
    """Validate args and compose the four deployments."""
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    return compose_app(args, PreprocessDeployment, VisionDeployment, LLMDeployment)


def compose_app(
    args: ServeArgs, preprocess_cls: type, vision_cls: type, llm_cls: type
) -> Application:
    """The graph with these stage classes (each constructed with `args`); `build_app` passes
    the real ones, `benchmarks/serve.py` model-free stand-ins to time the plumbing alone."""
    # Only an `auto` GPU option needs to know the cluster (and, under `serve run`, to connect).
    needs_cluster = "auto" in (args.vision_encoder.num_gpus, args.llm.num_gpus)
    has_gpus = cluster_has_gpus(args) if needs_cluster else False
    vision_gpus = _gpus(args.vision_encoder, has_gpus)
    logger.info(
        "building %s: pp_size=%d, GPUs in cluster: %s",
        args.model_name,
        args.engine.pp_size,
        has_gpus,
    )
    preprocess = (
        serve.deployment(preprocess_cls)
        .options(**deployment_options(args.preprocess, "Preprocess", num_gpus=0))
        .bind(args)
    )
    vision_options = deployment_options(args.vision_encoder, "VisionEncoder", num_gpus=vision_gpus)
    if args.vision.cache_bytes > 0:  # the embedding cache fills up to this; Ray reserves it
        vision_options["ray_actor_options"]["memory"] = int(args.vision.cache_bytes)
    vision = serve.deployment(vision_cls).options(**vision_options).bind(args)
    llm = serve.deployment(llm_cls).options(**llm_options(args, has_gpus)).bind(args)
    # The ingress admits `max_ongoing_requests` chats itself and answers the rest with its own
    # OpenAI-style 503 + Retry-After; Serve's cap sits above it (headroom for /health,
    # /v1/models and the refusals), so the proxy's plain-text backpressure is the last resort.
    max_inflight = args.ingress.max_ongoing_requests
    ingress_options = deployment_options(args.ingress, "Ingress", num_gpus=0)
    ingress_options["max_ongoing_requests"] = max_inflight + max(16, max_inflight // 4)
    ingress_options["ray_actor_options"]["runtime_env"] = {"env_vars": INGRESS_RAY_ENV}
    return (
        serve.deployment(IngressDeployment)
        .options(**ingress_options)
        .bind(
            preprocess,
            vision,
            llm,
            model_name=args.model_name,
            max_model_len=args.max_model_len,
            max_inflight=max_inflight,
            stream_interval_s=args.stream_interval_s,
            text_args=args,
            auth=ApiKeyAuth.from_args(args),  # keys read here: a bad source fails the deploy
        )
    )
