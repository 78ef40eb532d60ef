"""Tests for PP LLM replicas (deployments/llm.py, stage.py) on a simulated multi-node cluster: a
stage per GPU bundle across nodes, answers equal to PP=1, stage-crash recovery, the 76b topology.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from PIL import Image
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table
from ray.util.state import list_actors

from deployments.app import build_app
from internvl_core.chat import InternVLChat
from internvl_core.config import EngineConfig
from internvl_core.serve_args import DeploymentOptions, ServeArgs

pytestmark = [pytest.mark.serve, pytest.mark.slow]

CONFIG_76B = Path(__file__).resolve().parents[1] / "serve_configs" / "76b.yaml"
MODEL = "tiny-pp"
RECOVERY_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _forget_cluster_address(address: str) -> None:
    """`Cluster` records its address where a plain `ray.init()` on this machine would join it;
    remove that so other processes keep starting their own clusters."""
    path = Path(ray._private.utils.get_ray_address_file(None))
    if path.exists() and path.read_text().strip() == address:
        path.unlink()


@dataclass(frozen=True)
class SimCluster:
    """The simulated cluster (CPU-only head, 1-GPU nodes) and Serve's HTTP base URL."""

    cluster: Cluster
    url: str

    @property
    def address(self) -> str:
        return self.cluster.address


@pytest.fixture(scope="module")
def sim() -> Iterator[SimCluster]:
    """Head (CPU only: controller, proxy, ingress) + two nodes with one logical GPU each."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # local-only cluster (ray-serve-notes sec. 4)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    _forget_cluster_address(cluster.address)
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    port = _free_port()
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield SimCluster(cluster, f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def _fast(**overrides: Any) -> DeploymentOptions:
    values: dict[str, Any] = {
        "num_cpus": 0,
        "max_ongoing_requests": 32,
        "max_queued_requests": 64,
        "health_check_period_s": 1.0,
        "graceful_shutdown_timeout_s": 0.5,
    }
    return DeploymentOptions(**{**values, **overrides})


# ---- placement, read from Ray's state API -------------------------------------------------------
def _alive(address: str, class_name: str) -> list[Any]:
    """Alive actors of a class (`address`: this cluster's, as others run on the same machine)."""
    filters = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
    return list_actors(address=address, filters=filters, detail=True)


def _replica(address: str, app_name: str, deployment: str) -> Any:
    (replica,) = _alive(address, f"ServeReplica:{app_name}:{deployment}")
    return replica


def _bundle(actor: Any, resource: str) -> int:
    """The bundle an actor is pinned to: it requires `<resource>_group_<i>_<pg id>`."""
    (index,) = [
        int(key.split("_")[2])
        for key in actor.required_resources
        if key.startswith(f"{resource}_group_") and key.count("_") == 3
    ]
    return index


def _stages(address: str, pg_id: str) -> dict[int, Any]:
    """Alive StageActors of one placement group by the bundle each is pinned to."""
    stages = [a for a in _alive(address, "StageActor") if a.placement_group_id == pg_id]
    by_bundle = {_bundle(actor, "GPU"): actor for actor in stages}
    for index, actor in by_bundle.items():  # each holds its bundle's whole GPU
        assert actor.required_resources[f"GPU_group_{index}_{pg_id}"] == 1
    return by_bundle


def _check_one_stage_per_bundle(
    address: str, app_name: str, pp_size: int
) -> tuple[str, dict[int, Any]]:
    """Every stage on its own GPU bundle, the replica in bundle 0; returns (pg id, stages)."""
    replica = _replica(address, app_name, "LLM")
    pg_id = replica.placement_group_id
    table = placement_group_table()[pg_id]
    assert table["state"] == "CREATED"
    assert [table["bundles"][i].get("GPU") for i in range(pp_size)] == [1.0] * pp_size
    stages = _stages(address, pg_id)
    assert sorted(stages) == list(range(pp_size))
    for index, actor in stages.items():
        assert actor.node_id == table["bundles_to_node_id"][index]
    assert _bundle(replica, "CPU") == 0
    assert replica.node_id == table["bundles_to_node_id"][0]
    return pg_id, stages


# ---- requests ------------------------------------------------------------------------------------
def _image(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (30, 140, 220))


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(url: str, content: Any, *, max_tokens: int, model: str = MODEL) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_for(predicate: Callable[[], bool], *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def _stream_events(response: httpx.Response) -> Iterator[dict[str, Any] | str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


# ---- PP=2 across two nodes -----------------------------------------------------------------------
PP2_APP = "pp2"


@pytest.fixture(scope="module")
def pp_checkpoint(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("qwen2", num_llm_layers=4)


@pytest.fixture(scope="module")
def reference(pp_checkpoint: Path) -> InternVLChat:
    """The offline PP=1 model: what every PP=2 answer must equal, token for token."""
    return InternVLChat.from_pretrained(pp_checkpoint, dtype="float32", keep_grounding_tokens=True)


@pytest.fixture(scope="class")
def pp2_app(sim: SimCluster, pp_checkpoint: Path) -> Iterator[SimCluster]:
    args = ServeArgs(
        model_path=str(pp_checkpoint),
        served_model_name=MODEL,
        dtype="float32",
        engine=EngineConfig(pp_size=2, num_kv_blocks=256, max_model_len=4096),
        ingress=_fast(),
        preprocess=_fast(),
        vision_encoder=_fast(num_gpus=0),  # both GPUs go to the LLM's two stages
        llm=_fast(num_cpus=0.5, num_gpus=1),
    )
    serve.run(build_app(args), name=PP2_APP, route_prefix="/")
    try:
        yield sim
    finally:
        serve.delete(PP2_APP)


@pytest.mark.usefixtures("pp2_app")
class TestPipelineAcrossNodes:
    def test_each_stage_on_its_own_gpu_bundle(self, sim: SimCluster) -> None:
        pg_id, stages = _check_one_stage_per_bundle(sim.address, PP2_APP, pp_size=2)
        assert placement_group_table()[pg_id]["strategy"] == "PACK"
        # One GPU per node: the two stages (and so the hidden states) cross nodes.
        assert stages[0].node_id != stages[1].node_id

    def test_answers_equal_pp1(self, sim: SimCluster, reference: InternVLChat) -> None:
        config = {"max_new_tokens": 12, "do_sample": False}
        question = "Who are you?"
        answer = _chat(sim.url, question, max_tokens=12)["choices"][0]["message"]["content"]
        assert answer.strip() == reference.chat(None, question, config)
        image = _image(112, 56)
        content = [
            {"type": "image_url", "image_url": {"url": _data_url(image)}},
            {"type": "text", "text": "Describe it."},
        ]
        answer = _chat(sim.url, content, max_tokens=12)["choices"][0]["message"]["content"]
        pixels = reference.load_image(image)
        assert answer.strip() == reference.chat(pixels, "Describe it.", config)

    def test_stage_crash_fails_in_flight_and_replica_is_replaced(
        self, sim: SimCluster, reference: InternVLChat
    ) -> None:
        old_pg, stages = _check_one_stage_per_bundle(sim.address, PP2_APP, pp_size=2)
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count slowly."}],
            "max_tokens": 3000,
            "min_tokens": 3000,
            "stream": True,
        }
        events: list[dict[str, Any] | str] = []
        start = time.monotonic()
        with httpx.stream(
            "POST", f"{sim.url}/v1/chat/completions", json=body, timeout=30
        ) as response:
            assert response.status_code == 200
            for event in _stream_events(response):
                events.append(event)
                if len(events) == 4:  # mid-stream: a crash of the node's stage process
                    os.kill(stages[1].pid, signal.SIGKILL)
        assert time.monotonic() - start < 30
        assert events[-1] == "[DONE]"
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1, events[-3:]
        assert errors[0]["error"]["code"]
        # check_health fails, Serve replaces the replica (new group, new stages), service answers.

        def replaced() -> bool:
            try:
                pg_id = _replica(sim.address, PP2_APP, "LLM").placement_group_id
            except ValueError:  # no single alive replica right now
                return False
            return pg_id != old_pg and len(_stages(sim.address, pg_id)) == 2

        assert _wait_for(replaced, timeout_s=RECOVERY_TIMEOUT_S)
        assert placement_group_table()[old_pg]["state"] == "REMOVED"
        _check_one_stage_per_bundle(sim.address, PP2_APP, pp_size=2)
        question = "Who are you?"
        config = {"max_new_tokens": 12, "do_sample": False}
        answer = _chat(sim.url, question, max_tokens=12)["choices"][0]["message"]["content"]
        assert answer.strip() == reference.chat(None, question, config)


# ---- the 76B topology ----------------------------------------------------------------------------
def test_76b_topology_deploys_with_a_stage_per_bundle(
    sim: SimCluster, tiny_checkpoint: Callable[..., Path]
) -> None:
    """76b.yaml as written (PP=4, vision on its own GPU, its autoscaling and limits), with the
    tiny Llama checkpoint for the weights and CPU/KV knobs scaled down for this box."""
    sim.cluster.add_node(num_cpus=2, num_gpus=8)  # an 8-GPU node next to two 1-GPU nodes
    sim.cluster.wait_for_nodes()
    (app_config,) = yaml.safe_load(CONFIG_76B.read_text())["applications"]
    raw = dict(app_config["args"])
    checkpoint = tiny_checkpoint("llama", num_llm_layers=4)
    raw["model_path"] = str(checkpoint)
    raw["engine"] = {**raw["engine"], "num_kv_blocks": 256}
    # The YAML's 16 GiB embedding cache is reserved as Ray memory: more than this box has.
    raw["vision"] = {**raw["vision"], "cache_bytes": "64MiB"}
    for name in ("ingress", "preprocess", "vision_encoder", "llm"):
        small = {"num_cpus": 0.5 if name == "llm" else 0, "graceful_shutdown_timeout_s": 0.5}
        raw[name] = {**raw[name], **small}
    args = ServeArgs.model_validate(raw)
    assert args.engine.pp_size == 4
    assert args.vision_encoder.num_gpus == 1
    name = "llama76b"
    serve.run(build_app(args), name=name, route_prefix="/")
    try:
        _, stages = _check_one_stage_per_bundle(sim.address, name, pp_size=4)
        # PACK keeps the four stages on the one node with room for all of them (fast links).
        assert len({actor.node_id for actor in stages.values()}) == 1
        vision = _replica(sim.address, name, "VisionEncoder")
        assert vision.required_resources.get("GPU") == 1
        reply = _chat(sim.url, "Hello", max_tokens=4, model=args.model_name)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        serve.delete(name)
