"""deployments/replica_loss.py and the ingress's use of it, without Ray: a replica that died
under a request gives a 503 with Retry-After (never a 500), a request that got no token yet is
started again once on another replica, and an LLM stream passes a dead engine's error on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import RayServeException

from deployments.events import GenerationEvent, unwrap_error
from deployments.ingress import IngressDeployment, error_response
from deployments.replica_loss import REPLICA_LOST_RETRIES, leave_when_engine_dies, replica_lost
from internvl_core.errors import EngineDeadError, MediaError
from tests.ingress_fakes import (
    FakePreprocess,
    FakeVision,
    _Call,
    _Options,
)
from tests.ingress_fakes import chat_body as _body
from tests.ingress_fakes import make_request as _request
from tests.ingress_fakes import response_bytes as _read

MODEL = "fake-model"


def _upstream_crash() -> RayServeException:
    """What Serve raises for an LLM call whose vision result died with its replica."""
    error = RayServeException("an upstream actor died before finishing a dependent task")
    error.__cause__ = ActorDiedError()
    return error


def _wrapped(cause: Exception) -> Exception:
    """A replica's exception as the caller sees it: RayTaskError(cause)."""
    return RayTaskError("generate", "Traceback ...", cause).as_instanceof_cause()


@pytest.mark.parametrize(
    "exc",
    [ActorDiedError(), ActorUnavailableError("gone", None), _upstream_crash()],
    ids=["died", "unavailable", "upstream"],
)
def test_dead_replica_is_a_503_with_retry_after(exc: Exception) -> None:
    response = error_response(exc)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    error = json.loads(response.body)["error"]
    assert error["type"] == "engine_dead" and "died" in error["message"]


def test_dead_engine_from_a_replica_keeps_its_message() -> None:
    exc = _wrapped(EngineDeadError("engine loop died: ActorDiedError()"))
    assert replica_lost(unwrap_error(exc)) is not None
    response = error_response(exc)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "engine loop died" in json.loads(response.body)["error"]["message"]


def test_client_errors_are_not_replica_loss() -> None:
    assert replica_lost(MediaError("image could not be decoded")) is None
    assert replica_lost(RuntimeError("bug")) is None
    assert error_response(RuntimeError("bug")).status_code == 500


class DyingLLM(_Options):
    """Each of the first `deaths` generate calls fails before its first event, as a call to a
    replica that was killed; later calls stream "ok" from a live replica."""

    def __init__(
        self, deaths: int, error: Exception | None = None, *, after_first: bool = False
    ) -> None:
        super().__init__()
        self.deaths = deaths
        self.error = error or ActorDiedError()
        self.after_first = after_first  # die mid-generation, after one event
        self.request_ids: list[str] = []
        self.generate = _Call(self._generate)

    async def _generate(
        self, prepared: Any, embeds: Any, index: int, interval: float
    ) -> AsyncIterator[dict[str, Any]]:
        self.request_ids.append(await prepared if asyncio.isfuture(prepared) else prepared)
        dies = self.deaths > 0
        self.deaths -= dies
        if dies and not self.after_first:
            raise self.error
        yield GenerationEvent(text="o", token_ids=[1]).to_wire()
        if dies:
            raise self.error
        yield GenerationEvent(text="k", token_ids=[2], finish_reason="stop").to_wire()


def _serve(llm: DyingLLM, body: dict[str, Any]) -> tuple[int, bytes, IngressDeployment]:
    ingress = IngressDeployment(
        FakePreprocess(), FakeVision(), llm, model_name=MODEL, max_model_len=128, max_inflight=8
    )

    async def go() -> tuple[int, bytes]:
        response = await ingress(_request(body))
        return response.status_code, await _read(response)

    status, raw = asyncio.run(go())
    return status, raw, ingress


@pytest.mark.parametrize("stream", [False, True])
def test_request_whose_replica_died_before_a_token_is_started_again(stream: bool) -> None:
    llm = DyingLLM(deaths=REPLICA_LOST_RETRIES)
    status, raw, ingress = _serve(llm, _body(model=MODEL, stream=stream))
    assert status == 200 and b"error" not in raw
    assert b'"ok"' in raw or b'"o"' in raw  # a completion, or the stream's first chunk
    first, again = llm.request_ids  # the engine sees a fresh id: no clash with the lost one
    assert again == f"{first}.retry1"
    assert ingress.inflight == 0


def test_replica_deaths_past_the_retries_give_503() -> None:
    llm = DyingLLM(deaths=REPLICA_LOST_RETRIES + 1, error=_upstream_crash())
    status, raw, ingress = _serve(llm, _body(model=MODEL))
    assert status == 503
    assert json.loads(raw)["error"]["type"] == "engine_dead"
    assert len(llm.request_ids) == REPLICA_LOST_RETRIES + 1
    assert ingress.inflight == 0


def test_client_error_is_not_retried() -> None:
    llm = DyingLLM(deaths=1, error=MediaError("image could not be decoded"))
    status, _, _ = _serve(llm, _body(model=MODEL))
    assert status == 400 and len(llm.request_ids) == 1


# ---- the LLM replica's side: a dead engine makes it leave ----------------------------------------
async def _engine_stream(log: list[str], *, dies: bool) -> AsyncGenerator[int, None]:
    """An engine request's stream: one output, then the end or a dead engine; logs its abort."""
    try:
        yield 1
        if dies:
            raise EngineDeadError("engine loop died: ActorDiedError()")
        yield 2
    finally:
        log.append("closed")


def test_dead_engine_error_passes_through() -> None:
    log: list[str] = []

    async def go() -> list[int]:
        return [item async for item in leave_when_engine_dies(_engine_stream(log, dies=True))]

    with pytest.raises(EngineDeadError):
        asyncio.run(go())  # outside a replica, leaving is a no-op
    assert log == ["closed"]


def test_a_caller_that_stops_closes_the_engine_stream_at_once() -> None:
    """Closing the wrapper must run the engine stream's `finally` (its abort, freeing KV)."""
    log: list[str] = []

    async def go() -> None:
        stream = leave_when_engine_dies(_engine_stream(log, dies=False))
        assert await anext(stream) == 1
        await stream.aclose()
        assert log == ["closed"]

    asyncio.run(go())


def test_non_streaming_request_whose_replica_died_mid_generation_starts_again() -> None:
    llm = DyingLLM(deaths=1, after_first=True)
    status, raw, ingress = _serve(llm, _body(model=MODEL))
    assert status == 200
    assert json.loads(raw)["choices"][0]["message"]["content"] == "ok"
    first, again = llm.request_ids
    assert again == f"{first}.restart"
    assert ingress.inflight == 0


def test_stream_whose_replica_died_mid_generation_ends_with_an_error_event() -> None:
    llm = DyingLLM(deaths=1, after_first=True)
    status, raw, ingress = _serve(llm, _body(model=MODEL, stream=True))
    assert status == 200  # the first token went out: it cannot start again
    events = [line.removeprefix("data: ") for line in raw.decode().splitlines() if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "engine_dead"
    assert len(llm.request_ids) == 1 and ingress.inflight == 0
