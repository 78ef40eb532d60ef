"""Ingress (plain class, fake stage handles): API keys guard /v1/* and never reach logs or
errors; vLLM's `continuous_usage_stats` put the usage so far on every streamed chunk."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.auth import ApiKeyAuth
from tests.ingress_fakes import FakeLLM, call, chat_body, make_ingress, make_request

KEY = "sk-test-0123456789abcdef"


def test_continuous_usage_stats_put_usage_so_far_on_every_chunk() -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = chat_body(stream=True, stream_options=options, ignore_eos=True)
    status, raw = call(make_ingress(FakeLLM(["a", "b", "c"])), make_request(body))
    assert status == 200
    events = [line.removeprefix("data: ") for line in raw.decode().splitlines() if line]
    chunks = [json.loads(e) for e in events[:-1]]
    usages = [(c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"]) for c in chunks]
    assert usages == [(11, 0), (11, 1), (11, 2), (11, 3), (11, 3)]  # role, a, b, c, final
    assert all(c["usage"]["total_tokens"] == sum(u) for c, u in zip(chunks, usages, strict=True))
    plain = chat_body(stream=True, stream_options={"include_usage": True})
    _, raw = call(make_ingress(FakeLLM(["a", "b"])), make_request(plain))
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines() if "{" in line]
    assert ["usage" in c for c in chunks] == [False, False, False, True]


def test_api_keys_guard_v1_routes_and_leave_health_open(caplog: pytest.LogCaptureFixture) -> None:
    ingress = make_ingress(FakeLLM(["x"]), auth=ApiKeyAuth(["other-key", KEY]))
    caplog.set_level("DEBUG")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path, body in (("/v1/chat/completions", chat_body()), ("/v1/models", b"")):
            status, raw = call(ingress, make_request(body, path=path, headers=headers))
            error = json.loads(raw)["error"]
            assert status == 401 and error["type"] == "authentication_error", (headers, path)
            assert KEY not in raw.decode() and "wrong" not in raw.decode()
    bad = {"authorization": "Bearer nope"}
    refused = asyncio.run(ingress(make_request(chat_body(), headers=bad)))
    assert refused.headers["www-authenticate"] == "Bearer"
    assert ingress.metrics.statuses.count("401") == 4  # the refused chats are counted
    right = {"Authorization": f"Bearer {KEY}"}
    status, raw = call(ingress, make_request(chat_body(), headers=right))
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "x-0"
    assert call(ingress, make_request(b"", path="/v1/models", headers=right))[0] == 200
    assert call(ingress, make_request(b"", path="/health"))[0] == 200
    assert KEY not in caplog.text and "Bearer" not in caplog.text
