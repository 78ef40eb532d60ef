"""Tests for serve_configs/*.yaml through `build_app` (no deploy), and for per-deployment
autoscaling: on a local cluster, vision (queued tiles) and LLM (engine queue) replicas scale out
each on its own load.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from PIL import Image
from pydantic import ValidationError
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app as build_deployments
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeDeploySchema

from deployments.app import INGRESS_RAY_ENV, build_app, llm_options
from deployments.autoscaling import PENDING_TILES
from internvl_core.config import EngineConfig
from internvl_core.serve_args import AutoscalingOptions, DeploymentOptions, ServeArgs
from tests.serve_fixtures import fast_options, serve_cluster, wait_until

CONFIG_DIR = Path(__file__).resolve().parents[1] / "serve_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
DEPLOYMENTS = {"Ingress", "Preprocess", "VisionEncoder", "LLM"}

# Decoder family of each seed model (the tiny checkpoint substituted for its weights) and the
# pipeline size its YAML must give on 80 GB GPUs (Yi-34B and Llama-3-70B do not fit one GPU).
FAMILY = {
    "tiny": "qwen2",
    "1b": "qwen2",
    "2b": "internlm2",
    "4b": "phi3",
    "8b": "internlm2",
    "26b": "internlm2",
    "40b": "llama",
    "76b": "llama",
    "76b-int8": "llama",
    "v1-2-plus": "llama",
    "mini-4b-v1-5": "phi3",
}
PP_SIZE = {"40b": 2, "76b": 4, "76b-int8": 2, "v1-2-plus": 2}
QUANTIZATION = {"76b-int8": "8bit"}
# Serve policy each deployment scales with on a cluster (tiny.yaml runs fixed replicas).
DEFAULT_POLICY = "ray.serve.autoscaling_policy:default_autoscaling_policy"
POLICY = {
    "Ingress": DEFAULT_POLICY,
    "Preprocess": DEFAULT_POLICY,
    "VisionEncoder": "deployments.autoscaling:QueuedTilesPolicy",
    "LLM": "deployments.autoscaling:EngineQueuePolicy",
}


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _app_args(path: Path, tiny_checkpoint: Callable[..., Path]) -> dict[str, Any]:
    """The YAML's `args:` with the tiny checkpoint of the same family as `model_path`."""
    (app,) = _load(path)["applications"]
    checkpoint = tiny_checkpoint(FAMILY[path.stem], num_llm_layers=4)
    return {**app["args"], "model_path": str(checkpoint)}


def _deployments(args: ServeArgs) -> list[Any]:
    return build_deployments(build_app(args), name="app").deployments


def test_every_seed_model_has_a_config() -> None:
    assert {path.stem for path in CONFIGS} == set(FAMILY)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_yaml_validates_through_build_app(path: Path, tiny_checkpoint: Callable[..., Path]) -> None:
    schema = ServeDeploySchema.model_validate(_load(path))
    (app_schema,) = schema.applications
    assert app_schema.import_path == "deployments.app:build_app"
    # The same call Serve makes for YAML `args:` and for `serve run module:builder k=v`.
    app = call_user_app_builder_with_args_if_necessary(build_app, _app_args(path, tiny_checkpoint))
    assert isinstance(app, Application)
    built = build_deployments(app, name=app_schema.name)
    assert {d.name for d in built.deployments} == DEPLOYMENTS
    assert built.ingress_deployment_name == "Ingress"
    # Only the ingress inlines call arguments past Ray's 100 KB (the request bodies it holds);
    # the stages' replies (tiles, embeddings) keep the object store, away from the ingress.
    actor_options = {d.name: d.ray_actor_options for d in built.deployments}
    assert actor_options["Ingress"]["runtime_env"] == {"env_vars": INGRESS_RAY_ENV}
    assert not any("runtime_env" in actor_options[n] for n in DEPLOYMENTS - {"Ingress"})
    for deployment in built.deployments:  # backpressure everywhere: no unbounded queue
        assert deployment.max_ongoing_requests >= 1, deployment.name
        assert deployment.max_queued_requests >= 1, deployment.name
        autoscaling = deployment._deployment_config.autoscaling_config
        if path.stem == "tiny":
            assert autoscaling is None, deployment.name
            continue
        assert autoscaling.policy.policy_function == POLICY[deployment.name]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_vision_replica_reserves_its_cache_bytes(
    path: Path, tiny_checkpoint: Callable[..., Path]
) -> None:
    """The embedding cache is bounded by bytes and Ray reserves them (`memory`) per replica."""
    args = ServeArgs.model_validate(_app_args(path, tiny_checkpoint))
    assert 0 < args.vision.cache_bytes <= 16 * 2**30
    memory = {d.name: d.ray_actor_options.get("memory") for d in _deployments(args)}
    assert memory == {**dict.fromkeys(DEPLOYMENTS), "VisionEncoder": args.vision.cache_bytes}
    raw = _app_args(path, tiny_checkpoint)
    off = ServeArgs.model_validate({**raw, "vision": {**raw["vision"], "cache_bytes": 0}})
    memory_off = {d.name: d.ray_actor_options.get("memory") for d in _deployments(off)}
    assert memory_off == dict.fromkeys(DEPLOYMENTS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_yaml_gpu_topology(path: Path, tiny_checkpoint: Callable[..., Path]) -> None:
    """On a GPU cluster: one GPU bundle per pipeline stage (the replica in bundle 0), vision on
    its own GPU; tiny.yaml stays on CPU wherever it runs."""
    args = ServeArgs.model_validate(_app_args(path, tiny_checkpoint))
    pp_size = PP_SIZE.get(path.stem, 1)
    assert args.engine.pp_size == pp_size
    assert args.quantization == QUANTIZATION.get(path.stem)
    options = llm_options(args, has_gpus=True)
    if path.stem == "tiny":
        assert options["ray_actor_options"]["num_gpus"] == 0
        assert args.vision_encoder.num_gpus == 0
        return
    assert args.vision_encoder.num_gpus == 1
    vision, llm = args.vision_encoder.autoscaling, args.llm.autoscaling
    assert vision is not None
    assert llm is not None
    assert (vision.policy, llm.policy) == ("queued_tiles", "engine_queue")
    # One encoder batch (max_batch_tiles) at least, a few at most, queued per vision GPU.
    assert args.vision.max_batch_tiles <= vision.target_tiles_per_replica
    assert vision.target_tiles_per_replica <= 4 * args.vision.max_batch_tiles
    assert 1 <= llm.target_waiting_per_replica <= args.engine.max_num_seqs
    assert 0.5 <= llm.target_kv_usage < 1
    if pp_size == 1:
        assert options["ray_actor_options"]["num_gpus"] == 1
        assert "placement_group_bundles" not in options
        return
    bundles = options["placement_group_bundles"]
    assert [b.get("GPU") for b in bundles] == [1.0] * pp_size
    assert bundles[0]["CPU"] == args.llm.num_cpus
    assert options["ray_actor_options"] == {"num_cpus": args.llm.num_cpus, "num_gpus": 0}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"engine": {"pp_size": 0}}, "engine.pp_size"),
        ({"engine": {"pp_size": 5}}, "engine.pp_size"),  # the tiny decoder has 4 layers
        ({"dtype": "float8"}, "dtype"),
        ({"quantization": "3bit"}, "quantization"),
        ({"llm": {"max_ongoing_requests": 0}}, "llm.max_ongoing_requests"),
        ({"vision": {"max_batch_tiles": 0}}, "vision.max_batch_tiles"),
        ({"vision": {"cache_entries": 512}}, "vision.cache_bytes"),  # replaced: names the new one
        ({"vision": {"cache_bytes": -1}}, "vision.cache_bytes"),
        ({"model_pth": "x"}, "model_pth"),
        ({"model_path": "/nonexistent/checkpoint"}, "model_path"),
        ({"llm": {"autoscaling": {"policy": "queued_tiles"}}}, "llm.autoscaling.policy"),
        (
            {"vision_encoder": {"autoscaling": {"policy": "engine_queue"}}},
            "vision_encoder.autoscaling.policy",
        ),
        ({"preprocess": {"autoscaling": {"policy": "engine_queue"}}}, "preprocess.autoscaling"),
        ({"llm": {"autoscaling": {"target_kv_usage": 1.5}}}, "llm.autoscaling.target_kv_usage"),
        (
            {"vision_encoder": {"autoscaling": {"target_tiles_per_replica": 0}}},
            "vision_encoder.autoscaling.target_tiles_per_replica",
        ),
    ],
)
def test_wrong_arg_fails_naming_the_field(
    change: dict[str, Any], field: str, tiny_checkpoint: Callable[..., Path]
) -> None:
    args = {"model_path": str(tiny_checkpoint("qwen2", num_llm_layers=4)), **change}
    with pytest.raises(ValidationError) as info:
        call_user_app_builder_with_args_if_necessary(build_app, args)
    assert field in str(info.value)


def test_command_line_args_build(tiny_qwen2: Path) -> None:
    """`serve run deployments.app:build_app model_path=DIR` passes plain strings."""
    app = call_user_app_builder_with_args_if_necessary(
        build_app, {"model_path": str(tiny_qwen2), "dtype": "float32", "use_gpus": "false"}
    )
    assert isinstance(app, Application)


def _built(args: dict[str, Any]) -> dict[str, Any]:
    """Deployment name -> Serve Deployment of `build_app(args)`, as `serve run` builds it."""
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    return {d.name: d for d in build_deployments(app, name="app").deployments}


def test_defaults_fit_a_two_cpu_machine(tiny_qwen2: Path) -> None:
    """`serve run deployments.app:build_app model_path=DIR` on a laptop: every default replica
    schedules on 2 CPUs."""
    built = _built({"model_path": str(tiny_qwen2), "use_gpus": False})
    options = [d.ray_actor_options for d in built.values()]
    assert sum(o["num_cpus"] for o in options) <= 2
    assert all(o["num_gpus"] == 0 for o in options)


@pytest.mark.parametrize("use_gpus", [True, False])
def test_explicit_use_gpus_needs_no_cluster(tiny_qwen2: Path, use_gpus: bool) -> None:
    built = _built({"model_path": str(tiny_qwen2), "use_gpus": use_gpus})
    assert not ray.is_initialized()
    for name in ("VisionEncoder", "LLM"):
        assert built[name].ray_actor_options["num_gpus"] == float(use_gpus)
    assert built["Preprocess"].ray_actor_options["num_gpus"] == 0


def test_models_card_reports_the_capped_context(tiny_qwen2: Path) -> None:
    """engine.max_model_len past the checkpoint's 32768 positions: /v1/models (the ingress's
    max_model_len) says what the engine and Preprocess enforce."""
    args = {"model_path": str(tiny_qwen2), "use_gpus": False, "engine": {"max_model_len": 10**6}}
    built = _built(args)
    assert ServeArgs.model_validate(args).max_model_len == 32768
    assert built["Ingress"].init_kwargs["max_model_len"] == 32768


@pytest.mark.serve
@pytest.mark.slow
def test_auto_gpus_seen_from_a_cpu_only_launcher(
    tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`RAY_ADDRESS=... serve run deployments.app:build_app model_path=DIR` from a CPU-only head
    (as this machine): the builder runs before `serve run` connects, yet the GPU stages get the
    worker node's GPUs."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        cluster.add_node(num_cpus=1, num_gpus=2)
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        assert not ray.is_initialized()
        built = _built({"model_path": str(tiny_qwen2)})
        assert ray.is_initialized()
        assert built["LLM"].ray_actor_options["num_gpus"] == 1
        assert built["VisionEncoder"].ray_actor_options["num_gpus"] == 1
    finally:
        ray.shutdown()
        cluster.shutdown()
        _forget_cluster_address(cluster.address)


def _forget_cluster_address(address: str) -> None:
    """`Cluster` records its address where a plain `ray.init()` on this machine would join it;
    remove that so other processes keep starting their own clusters."""
    path = Path(ray._private.utils.get_ray_address_file(None))
    if path.exists() and path.read_text().strip() == address:
        path.unlink()


# ---- autoscaling: vision and LLM replicas follow their own load --------------------------------
IMAGE_SIDE = (448, 280)  # 8 x 5 tiles of 56 px (+ thumbnail) at max_dynamic_patch 40
IMAGES_PER_REQUEST = 3  # 123 tiles: the vision pool does most of the work
IMAGE_TILES = 41  # one image: 40 tiles + thumbnail
ABANDON_AFTER_S = 1.0  # client timeout of the disconnecting requests
VIT_LAYERS = 64  # a deep tiny ViT: encoding dominates image requests, as with InternViT-6B
PHASE_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def serve_url() -> Iterator[str]:
    """A local Ray cluster with logical GPUs (one per vision or LLM replica) and Serve."""
    with serve_cluster(num_cpus=4, num_gpus=4) as url:
        yield url


def _scaled(**policy: Any) -> DeploymentOptions:
    """1..2 replicas under `policy` reacting within about a second (upscale at once, short
    windows)."""
    autoscaling = AutoscalingOptions(
        min_replicas=1,
        max_replicas=2,
        upscale_delay_s=0,
        downscale_delay_s=1,
        look_back_period_s=1,
        metrics_interval_s=0.2,
        **policy,
    )
    return _fast(autoscaling=autoscaling, num_gpus=1, max_ongoing_requests=32)


def _fast(**overrides: Any) -> DeploymentOptions:
    return fast_options(**{"max_queued_requests": 128, **overrides})


@dataclass
class ReplicaPeaks:
    """Largest replica counts seen per deployment: starting or running, and running."""

    active: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)

    def add(self, states: dict[str, dict[str, int]]) -> None:
        for name, counts in states.items():
            active = sum(n for state, n in counts.items() if state != "STOPPING")
            self.active[name] = max(self.active.get(name, 0), active)
            self.running[name] = max(self.running.get(name, 0), counts.get("RUNNING", 0))


def _replica_states(app_name: str) -> dict[str, dict[str, int]]:
    """Replica count per state (STARTING, RUNNING, STOPPING, ...) for each deployment."""
    deployments = serve.status().applications[app_name].deployments
    return {name: dict(d.replica_states) for name, d in deployments.items()}


def _png_data_url(index: int) -> str:
    """A distinct image per index (no embedding-cache or prefix-cache hits between requests)."""
    color = (index % 251, (index // 251) % 251, 99)
    buffer = io.BytesIO()
    Image.new("RGB", IMAGE_SIDE, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _image_request(index: int) -> dict[str, Any]:
    images = [
        {"type": "image_url", "image_url": {"url": _png_data_url(index * 8 + k)}}
        for k in range(IMAGES_PER_REQUEST)
    ]
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": [*images, {"type": "text", "text": "Compare."}]}],
        "max_tokens": 1,
        "max_dynamic_patch": 40,
    }


def _text_request(index: int) -> dict[str, Any]:
    question = f"Tell a long story number {index}."
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 64,
        "min_tokens": 64,
    }


async def _drive(
    url: str,
    make_request: Callable[[int], dict[str, Any]],
    *,
    concurrency: int,
    done: Callable[[], bool],
) -> list[int]:
    """Closed-loop load until `done()` or PHASE_TIMEOUT_S; returns every HTTP status seen."""
    statuses: list[int] = []
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    counter = iter(range(10**6))

    async def worker(client: httpx.AsyncClient) -> None:
        while not done() and time.monotonic() < deadline:
            response = await client.post("/v1/chat/completions", json=make_request(next(counter)))
            statuses.append(response.status_code)

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses


async def _load_and_watch(
    url: str,
    app_name: str,
    make_request: Callable[[int], dict[str, Any]],
    *,
    concurrency: int,
    scaled: str,
) -> tuple[list[int], ReplicaPeaks]:
    """Drive load until `scaled` has 2 running replicas; returns the statuses and the replica
    counts seen meanwhile."""
    peaks = ReplicaPeaks()

    def reached() -> bool:
        return peaks.running.get(scaled, 0) >= 2

    async def watch() -> None:
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while not reached() and time.monotonic() < deadline:
            peaks.add(await asyncio.to_thread(_replica_states, app_name))
            await asyncio.sleep(0.25)

    statuses, _ = await asyncio.gather(
        _drive(url, make_request, concurrency=concurrency, done=reached), watch()
    )
    return statuses, peaks


def _max_pending_tiles(pool: DeploymentHandle, reads: int = 10) -> float:
    """The largest pending-tile count over `reads` calls (each reaches a random replica)."""
    return max(pool.record_autoscaling_stats.remote().result()[PENDING_TILES] for _ in range(reads))


async def _abandon_image_requests(
    url: str, pool: DeploymentHandle, *, count: int
) -> tuple[float, int]:
    """`count` image requests whose clients disconnect after ABANDON_AFTER_S, mid-encoding.

    Returns the most pending tiles seen in the pool meanwhile and how many were abandoned.
    """
    seen = 0.0

    async def post(client: httpx.AsyncClient, index: int) -> bool:
        try:
            await client.post("/v1/chat/completions", json=_image_request(10**5 + index))
        except httpx.TimeoutException:
            return True
        return False

    async with httpx.AsyncClient(base_url=url, timeout=ABANDON_AFTER_S) as client:
        posts = [asyncio.ensure_future(post(client, i)) for i in range(count)]
        while not all(p.done() for p in posts):
            stats = await pool.record_autoscaling_stats.remote()
            seen = max(seen, stats[PENDING_TILES])
            await asyncio.sleep(0.05)
        return seen, sum([p.result() for p in posts])


def _wait_for_replicas(app_name: str, deployment: str, count: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = _replica_states(app_name)[deployment]
        if sum(n for state, n in counts.items() if state != "STOPPING") == count:
            return True
        time.sleep(0.25)
    return False


@pytest.mark.serve
@pytest.mark.slow
def test_vision_and_llm_scale_independently(
    serve_url: str, tiny_checkpoint: Callable[..., Path]
) -> None:
    checkpoint = tiny_checkpoint("qwen2", num_vit_layers=VIT_LAYERS)
    args = ServeArgs(
        model_path=str(checkpoint),
        served_model_name="tiny",
        dtype="float32",
        ingress=_fast(max_ongoing_requests=64),
        preprocess=_fast(max_ongoing_requests=32),
        # One image request queues 123 tiles: two replicas' worth.
        vision_encoder=_scaled(policy="queued_tiles", target_tiles_per_replica=64),
        # Two sequences run per engine; text load leaves the rest waiting, over target.
        llm=_scaled(policy="engine_queue", target_waiting_per_replica=2, target_kv_usage=0.9),
        engine=EngineConfig(max_num_seqs=2, num_kv_blocks=512),
    )
    app_name = "autoscaling"
    serve.run(build_app(args), name=app_name, route_prefix="/")
    try:
        # Image-heavy, one output token: the vision pool queues, the LLM keeps up.
        statuses, peaks = asyncio.run(
            _load_and_watch(
                serve_url, app_name, _image_request, concurrency=12, scaled="VisionEncoder"
            )
        )
        assert peaks.running["VisionEncoder"] == 2
        assert peaks.active["LLM"] == 1
        assert set(statuses) == {200}
        # Idle again, the vision pool returns to its minimum.
        assert _wait_for_replicas(app_name, "VisionEncoder", 1, timeout_s=30)
        # Text only, long outputs: the LLM scales out, the vision pool is never called.
        statuses, peaks = asyncio.run(
            _load_and_watch(serve_url, app_name, _text_request, concurrency=8, scaled="LLM")
        )
        assert peaks.running["LLM"] == 2
        assert peaks.active["VisionEncoder"] == 1
        assert set(statuses) == {200}
        # The vision policy's signal: tiles count while in the pool and none stays behind
        # once the requests are gone, those whose clients disconnected included.
        pool = serve.get_deployment_handle("VisionEncoder", app_name)
        seen, abandoned = asyncio.run(_abandon_image_requests(serve_url, pool, count=8))
        assert seen >= IMAGE_TILES
        assert abandoned >= 1
        assert wait_until(lambda: _max_pending_tiles(pool) == 0, timeout_s=PHASE_TIMEOUT_S)
    finally:
        serve.delete(app_name)
