"""Test support: chaos under load. A bounded mixed load over HTTP on 127.0.0.1 while replicas and
pipeline stage actors of a running app are killed; every outcome classified, recovery timed.

In: the app's base URL and name on a Ray cluster this process is connected to. Out: a
ChaosReport (per request outcomes, per kill recovery seconds) that `tests/test_serve_chaos.py`
asserts on and `benchmarks/chaos.py` prints as one JSON line.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ray
from PIL import Image
from ray import serve

from internvl_core.config import EngineConfig
from internvl_core.serve_args import ServeArgs
from tests.serve_fixtures import fast_options, tiny_serve_args

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 60.0  # a request past this is a hang
RECOVERY_TIMEOUT_S = 90.0
POLL_S = 0.25
SERVE_NAMESPACE = "serve"
# What a client may see instead of a 200: an OpenAI error JSON with one of these statuses, or
# a 200 stream that ends with an error event and [DONE]. A 500 (or 502/504, a hang, a dropped
# connection) is never acceptable.
CLEAR_ERROR_STATUSES = frozenset({400, 413, 422, 429, 503})


# ---- the load ----------------------------------------------------------------------------------
def _png_data_url(seed: int, width: int, height: int) -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)  # [H, W, 3]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def mixed_bodies(
    model: str, num_requests: int, *, image_share: float = 0.5, max_tokens: int = 16, seed: int = 0
) -> list[dict[str, Any]]:
    """Text and image chats, streaming and not; every image distinct (no cache hits hide a
    dead vision replica)."""
    rng = np.random.default_rng(seed)
    bodies = []
    for i in range(num_requests):
        text = f"Request {i}: describe item {rng.integers(1000)} in a few words."
        content: str | list[dict[str, Any]] = text
        if rng.random() < image_share:
            width, height = (int(v) for v in rng.integers(40, 160, 2))
            url = _png_data_url(seed * 100_003 + i, width, height)
            content = [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ]
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "min_tokens": max_tokens,
            "temperature": 0.7,
            "seed": i,
            "stream": bool(rng.random() < 0.5),
        }
        bodies.append(body)
    return bodies


@dataclass
class Outcome:
    """How one request ended: `kind` is ok, http_error, sse_error, timeout or transport."""

    index: int
    stream: bool
    kind: str
    status: int | None
    end: float
    detail: str = ""

    @property
    def clear(self) -> bool:
        """A 200, or an error the client can act on (OpenAI JSON / SSE error event)."""
        if self.kind in ("ok", "sse_error"):
            return True
        return self.kind == "http_error" and self.status in CLEAR_ERROR_STATUSES

    @property
    def label(self) -> str:
        """The key of `errors_by_status`."""
        if self.kind == "http_error":
            return str(self.status)
        return self.kind


def _error_json(text: str) -> dict[str, Any] | None:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) and error.get("message") else None


async def _send_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple:
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            return "http_error", response.status_code, text[:300], _error_json(text)
        events: list[Any] = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    if not events or events[-1] != "[DONE]":
        return "transport", 200, f"stream ended without [DONE]: {events[-2:]}", None
    if errors:
        return "sse_error", 200, json.dumps(errors[0])[:300], errors[0]["error"]
    return "ok", 200, "", None


async def _send_unary(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple:
    response = await client.post(url, json=body)
    if response.status_code == 200:
        return "ok", 200, "", None
    return "http_error", response.status_code, response.text[:300], _error_json(response.text)


async def send(client: httpx.AsyncClient, url: str, index: int, body: dict[str, Any]) -> Outcome:
    """One request to its end; never raises (a timeout or a broken connection is an outcome)."""
    stream = bool(body.get("stream"))
    try:
        sender = _send_stream if stream else _send_unary
        kind, status, detail, error = await asyncio.wait_for(
            sender(client, url, body), timeout=REQUEST_TIMEOUT_S
        )
        if kind in ("http_error", "sse_error") and error is None:
            kind = "transport"  # an error without OpenAI error JSON is not a clear error
    except (TimeoutError, httpx.TimeoutException) as e:
        kind, status, detail = "timeout", None, repr(e)
    except httpx.HTTPError as e:
        kind, status, detail = "transport", None, repr(e)
    return Outcome(index, stream, kind, status, time.monotonic(), detail)


# ---- finding and killing actors ----------------------------------------------------------------
def replica_names(app: str, deployment: str) -> set[str]:
    """Names of the live replica actors of one deployment (Serve names them app#deployment#id)."""
    names = ray.util.list_named_actors(all_namespaces=True)
    tag = f"{app}#{deployment}#"
    return {n["name"] for n in names if n["namespace"] == SERVE_NAMESPACE and tag in n["name"]}


def kill_replica(name: str) -> None:
    """`ray.kill` the replica actor: a crash as Serve sees it (no graceful shutdown)."""
    ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)


def _alive_actors() -> dict[str, dict[str, Any]]:
    # The GCS actor table: works without the dashboard (ray.util.state needs it).
    table = ray._private.state.actors()
    return {aid: info for aid, info in table.items() if info["State"] == "ALIVE"}


def stage_pids(replica_name: str) -> list[int]:
    """Pids of the StageActors a replica owns (its pipeline stages)."""
    alive = _alive_actors()
    owners = [i for i in alive.values() if i["Name"] == replica_name]
    if not owners:
        return []
    address = owners[0]["Address"]
    worker = (address["IPAddress"], address["Port"])  # the replica's worker process
    return [
        int(info["Pid"])
        for info in alive.values()
        if info["ActorClassName"] == "StageActor"
        and (info["OwnerAddress"]["IPAddress"], info["OwnerAddress"]["Port"]) == worker
    ]


def kill_stage(replica_name: str) -> None:
    """SIGKILL the last stage of a replica: a stage process crash. (A stage's handle lives only
    in its replica, and Ray's kill-by-handle needs the handle, so the process is killed.)"""
    pids = stage_pids(replica_name)
    if not pids:
        raise RuntimeError(f"{replica_name} owns no StageActor")
    os.kill(max(pids), signal.SIGKILL)


def deployment_running(app: str, deployment: str, target: int) -> bool:
    status = serve.status().applications[app].deployments[deployment]
    return dict(status.replica_states) == {"RUNNING": target}


# ---- chaos -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kill:
    """What to kill once `after_started` requests have been sent: a replica of `deployment`, or
    (`stage=True`) one pipeline stage actor of an LLM replica."""

    deployment: str
    after_started: int
    stage: bool = False

    @property
    def name(self) -> str:
        return f"{self.deployment}_stage" if self.stage else f"{self.deployment}_replica"


@dataclass
class KillRecord:
    """One kill: when, whose replica, and seconds until the deployment had its replicas running
    again (a new one in place of the lost one) and a probe request through every stage got 200."""

    name: str
    replica: str
    at: float
    inflight: int = 0
    recovery_s: float | None = None
    errors: Counter[str] = field(default_factory=Counter)  # lost requests by label

    @property
    def lost(self) -> int:
        return sum(self.errors.values())


@dataclass
class ChaosReport:
    outcomes: list[Outcome] = field(default_factory=list)
    kills: list[KillRecord] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return sum(o.kind == "ok" for o in self.outcomes)

    @property
    def lost(self) -> int:
        return len(self.outcomes) - self.ok

    def errors_by_status(self) -> dict[str, int]:
        return dict(Counter(o.label for o in self.outcomes if o.kind != "ok"))

    def unclear(self) -> list[Outcome]:
        """Outcomes a client could not act on: 5xx other than 503, hangs, broken streams."""
        return [o for o in self.outcomes if not o.clear]

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.outcomes),
            "ok": self.ok,
            "lost": self.lost,
            "errors_by_status": self.errors_by_status(),
            "unclear": len(self.unclear()),
            "recovery_s": {k.name: k.recovery_s for k in self.kills},
            "lost_per_kill": {k.name: k.lost for k in self.kills},
            "errors_per_kill": {k.name: dict(k.errors) for k in self.kills},
            "inflight_at_kill": {k.name: k.inflight for k in self.kills},
            "wall_s": round(self.wall_s, 2),
        }


def probe_body(model: str, seed: int) -> dict[str, Any]:
    """A small image chat: it goes through Preprocess, the vision pool and an LLM replica."""
    url = _png_data_url(10**9 + seed, 64, 48)
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2}


class ChaosRun:
    """Runs the load with `concurrency` workers; a controller task kills per `kills`, one at a
    time, each after the previous one recovered. Every loop ends by itself: the workers when
    the bodies run out, the controller after its last kill (or its recovery deadline)."""

    def __init__(self, base_url: str, app: str, model: str, *, replicas: dict[str, int]) -> None:
        self.url = f"{base_url}/v1/chat/completions"
        self.app = app
        self.model = model
        self.replicas = replicas  # deployment -> target replica count
        self.started = 0
        self.report = ChaosReport()
        self.original: dict[str, set[str]] = {}  # replicas up before the load

    async def run(
        self,
        bodies: list[dict[str, Any]],
        kills: list[Kill],
        *,
        concurrency: int,
        rate_per_s: float,
    ) -> None:
        """Request i leaves at `i / rate_per_s` s (or later, with `concurrency` in flight at
        most): a load that lasts as long on a fast machine as on a slow one, kills included."""
        self.original = {d: replica_names(self.app, d) for d in self.replicas}
        start = time.monotonic()
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
            queue = iter(enumerate(bodies))

            async def worker() -> None:
                for index, body in queue:
                    await asyncio.sleep(start + index / rate_per_s - time.monotonic())
                    self.started += 1
                    self.report.outcomes.append(await send(client, self.url, index, body))

            controller = asyncio.create_task(self._controller(client, kills))
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            await controller
        self.report.wall_s = time.monotonic() - start
        self._attribute_losses()

    async def _controller(self, client: httpx.AsyncClient, kills: list[Kill]) -> None:
        """Kills in order, each once its request count is reached and the previous kill of the
        same deployment has recovered (so a survivor is up); recoveries are timed concurrently."""
        recovering: dict[str, asyncio.Task[None]] = {}
        for kill in kills:
            while self.started < kill.after_started:
                await asyncio.sleep(POLL_S)
            earlier = recovering.get(kill.deployment)
            if earlier is not None:
                await earlier
            record = await asyncio.to_thread(self._kill, kill)
            record.inflight = self.started - len(self.report.outcomes)
            self.report.kills.append(record)
            logger.info("killed %s (%s), %d in flight", kill.name, record.replica, record.inflight)
            recovering[kill.deployment] = asyncio.create_task(self._timed(client, kill, record))
        await asyncio.gather(*recovering.values())

    async def _timed(self, client: httpx.AsyncClient, kill: Kill, record: KillRecord) -> None:
        record.recovery_s = await self._recover(client, kill.deployment, record)
        logger.info("%s: recovered in %s s", kill.name, record.recovery_s)

    def _kill(self, kill: Kill) -> KillRecord:
        # A replica that served since the start (not a fresh replacement): it holds requests.
        names = replica_names(self.app, kill.deployment)
        name = sorted(names & self.original[kill.deployment] or names)[0]
        at = time.monotonic()
        if kill.stage:
            kill_stage(name)
        else:
            kill_replica(name)
        return KillRecord(kill.name, name, at)

    async def _recover(
        self, client: httpx.AsyncClient, deployment: str, record: KillRecord
    ) -> float | None:
        """Seconds from the kill until the replica was replaced and a probe got a 200."""
        target = self.replicas[deployment]
        before = replica_names(self.app, deployment) | {record.replica}

        def replaced() -> bool:
            names = replica_names(self.app, deployment)
            return (
                record.replica not in names
                and len(names) == target
                and bool(names - before)
                and deployment_running(self.app, deployment, target)
            )

        deadline = record.at + RECOVERY_TIMEOUT_S
        probes = 0
        while time.monotonic() < deadline:
            if await asyncio.to_thread(replaced):
                probes += 1
                outcome = await send(client, self.url, -probes, probe_body(self.model, probes))
                if outcome.kind == "ok":
                    return round(time.monotonic() - record.at, 2)
            await asyncio.sleep(POLL_S)
        return None

    def _attribute_losses(self) -> None:
        """Each lost request counts against the latest kill before it ended."""
        for outcome in self.report.outcomes:
            if outcome.kind == "ok":
                continue
            earlier = [k for k in self.report.kills if k.at <= outcome.end]
            if earlier:
                earlier[-1].errors[outcome.label] += 1


def surviving_engines_idle(
    stats: Callable[[], dict[str, Any]], idle: Callable[[dict[str, Any]], bool], *, calls: int
) -> bool:
    """`calls` stats calls through the deployment handle (the router spreads them over every
    replica) all show an idle engine with every KV block free."""
    return all(idle(stats()) for _ in range(calls))


# ---- the app under chaos -----------------------------------------------------------------------
CHAOS_REPLICAS = {"VisionEncoder": 2, "LLM": 2}
CHAOS_KILLS = [
    Kill("VisionEncoder", after_started=40),
    Kill("LLM", after_started=60),
    Kill("LLM", after_started=100, stage=True),  # once the first LLM kill has recovered
]


def chaos_args(model_path: Path, model: str) -> ServeArgs:
    """Two vision replicas and two PP=2 LLM replicas (each stage on a logical GPU), so a
    survivor serves while Serve replaces what was killed; fast health checks and shutdowns."""
    pool = {"max_ongoing_requests": 64, "max_queued_requests": 128, "num_gpus": "auto"}
    return tiny_serve_args(
        model_path,
        served_model_name=model,
        engine=EngineConfig(pp_size=2, num_kv_blocks=512, max_model_len=4096, max_num_seqs=32),
        ingress=fast_options(max_ongoing_requests=128, max_queued_requests=128),
        vision_encoder=fast_options(num_replicas=CHAOS_REPLICAS["VisionEncoder"], **pool),
        llm=fast_options(num_replicas=CHAOS_REPLICAS["LLM"], **pool),
    )
