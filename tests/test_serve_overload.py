"""Overload end to end: an app with small limits whose LLM is held busy answers a full queue and
a burst with OpenAI-style 503s carrying Retry-After, then answers normally again. The app is
served below a route prefix, as on a cluster shared by several models, on both HTTP ports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from internvl_core.serve_args import ServeArgs
from tests.serve_fixtures import (
    deployed_app,
    engine_idle,
    fast_options,
    serve_cluster,
    tiny_serve_args,
    wait_until,
)

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MODEL = "internvl2-tiny-test"
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    with serve_cluster(num_cpus=8, num_gpus=4, throughput_mode=True) as url:
        yield url


def chat_body(text: str, **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 12}
    return {**body, **fields}


@dataclass
class Overload:
    """Responses of an app whose LLM is held busy: one refusal, then a burst; and one after."""

    refused: httpx.Response
    burst: list[httpx.Response]
    after: httpx.Response
    after_via_proxy: httpx.Response
    models: httpx.Response


OVERLOAD_PREFIX = "/overload"


def overload_args(path: Path) -> ServeArgs:
    """Ingress admits 3 chats (its own 503 past that; Serve's queue in front of it is bounded
    but roomy, so refusals come from the ingress as OpenAI JSON); LLM: 1 at once + 1 queued."""
    return tiny_serve_args(
        path,
        served_model_name=MODEL,
        ingress=fast_options(max_ongoing_requests=3, max_queued_requests=32),
        llm=fast_options(max_ongoing_requests=1, max_queued_requests=1, num_gpus="auto"),
    )


async def overload_scenario(url: str) -> tuple[httpx.Response, list[httpx.Response]]:
    """A runs in the LLM, B waits in the LLM's queue (both hold an ingress slot); then C finds
    the LLM queue full, and a burst runs into the ingress's admission limit."""
    long = chat_body("Go on.", max_tokens=2000, min_tokens=2000, stream=True)
    short = chat_body("Hi.", max_tokens=4)
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        running = await client.send(client.build_request("POST", url, json=long), stream=True)
        assert running.status_code == 200  # headers come after the first token
        queued = asyncio.create_task(client.post(url, json=long))
        await asyncio.sleep(1.0)  # B reaches the LLM's queue
        try:
            refused = await client.post(url, json=short)
            burst = await asyncio.gather(*(client.post(url, json=short) for _ in range(16)))
        finally:  # disconnecting aborts both long requests
            queued.cancel()
            await asyncio.gather(queued, return_exceptions=True)
            await running.aclose()
    return refused, list(burst)


class TestOverload:
    """A second, small-limits app, served below a route prefix as a shared cluster's would be."""

    @pytest.fixture(scope="class")
    def overload(self, cluster_url: str, tiny_qwen2: Path) -> Iterator[Overload]:
        with deployed_app(overload_args(tiny_qwen2), "overload", OVERLOAD_PREFIX) as direct:
            url = f"{direct[0]}{OVERLOAD_PREFIX}/v1/chat/completions"
            refused, burst = asyncio.run(overload_scenario(url))
            llm = serve.get_deployment_handle("LLM", app_name="overload")

            def llm_idle() -> bool:
                return engine_idle(llm.stats.remote().result(timeout_s=TIMEOUT_S))

            assert wait_until(llm_idle, timeout_s=10.0)  # both long requests were aborted
            after = httpx.post(url, json=chat_body("Hi."), timeout=TIMEOUT_S)
            proxy = f"{cluster_url}{OVERLOAD_PREFIX}/v1/chat/completions"
            via_proxy = httpx.post(proxy, json=chat_body("Hi."), timeout=TIMEOUT_S)
            models = httpx.get(f"{direct[0]}{OVERLOAD_PREFIX}/v1/models", timeout=TIMEOUT_S)
            yield Overload(refused, burst, after, via_proxy, models)

    def test_full_llm_queue_gives_openai_503_with_retry_after(self, overload: Overload) -> None:
        assert overload.refused.status_code == 503
        assert int(overload.refused.headers["retry-after"]) >= 1
        assert overload.refused.json()["error"]["type"] == "overloaded"

    def test_burst_gets_only_503s(self, overload: Overload) -> None:
        assert [r.status_code for r in overload.burst] == [503] * len(overload.burst)

    def test_answers_normally_after_overload(self, overload: Overload) -> None:
        assert overload.after.status_code == 200
        assert overload.after.json()["choices"][0]["finish_reason"] in ("stop", "length")

    def test_served_below_its_route_prefix_on_both_ports(self, overload: Overload) -> None:
        assert overload.after_via_proxy.status_code == 200
        assert overload.after_via_proxy.json()["choices"] == overload.after.json()["choices"]
        assert overload.models.status_code == 200
        assert [m["id"] for m in overload.models.json()["data"]] == [MODEL]

    def test_every_503_is_openai_json_with_retry_after(self, overload: Overload) -> None:
        for response in overload.burst:
            assert "retry-after" in response.headers
            assert response.json()["error"]["type"] == "overloaded"
