"""Tests for benchmarks/serving_metrics.py: stream timings -> vLLM's serving metrics, by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.serving_metrics import (
    RequestRecord,
    StreamTimer,
    parse_goodput,
    request_kind,
    summarize,
    summarize_by_kind,
    write_trace,
)


def _chunk(content: str | None = "x", usage: tuple[int, int] | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "choices": [] if content is None else [{"delta": {"content": content}}]
    }
    if usage is not None:
        payload["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1]}
    return payload


def _stream(start: float, events: list[tuple[float, dict[str, Any]]]) -> RequestRecord:
    timer = StreamTimer("text", start)
    for now, payload in events:
        timer.on_payload(payload, now)
    return timer.finish()


def _records() -> list[RequestRecord]:
    # Role chunk with the first token at 0.1, then tokens at 0.1, 0.2, 0.4; usage after.
    four = _stream(
        0.0,
        [
            (0.1, _chunk("")),
            (0.1, _chunk("a")),
            (0.2, _chunk("b")),
            (0.4, _chunk("cd", usage=(10, 3))),  # continuous usage: counts so far
            (0.45, _chunk(None, usage=(10, 4))),  # the final usage chunk: no choices
        ],
    )
    one = _stream(1.0, [(1.3, _chunk("")), (1.3, _chunk("a")), (1.4, _chunk(None, (10, 1)))])
    failed = StreamTimer("image", 0.5).fail("HTTP 503")
    return [four, one, failed]


def test_stream_timer_follows_vllm_bench() -> None:
    four, one, failed = _records()
    assert four.success and four.ttft_s == pytest.approx(0.1)
    assert four.itl_s == pytest.approx([0.0, 0.1, 0.2])  # one gap per chunk, role chunk included
    assert four.latency_s == pytest.approx(0.4)  # the usage-only chunk does not count
    assert (four.prompt_tokens, four.output_tokens) == (10, 4)
    assert four.tpot_s == pytest.approx(0.1)  # (0.4 - 0.1) / (4 - 1)
    assert one.tpot_s == 0.0 and one.ttft_s == pytest.approx(0.3)
    assert not failed.success and failed.error == "HTTP 503"


def test_error_event_or_no_chunk_is_a_failure() -> None:
    errored = _stream(0.0, [(0.1, _chunk("")), (0.2, {"error": {"message": "engine died"}})])
    assert not errored.success and errored.error == "engine died"
    empty = _stream(0.0, [])
    assert not empty.success and empty.error is not None


def test_summarize_by_hand() -> None:
    out = summarize(_records(), 2.0, goodput={"ttft_ms": 200.0})
    assert (out["completed"], out["failed"]) == (2, 1)
    assert out["request_throughput"] == 1.0
    assert out["output_throughput"] == 2.5  # (4 + 1) tokens / 2 s
    assert out["total_token_throughput"] == 12.5  # (20 + 5) / 2
    assert out["request_goodput"] == 0.5  # only the 100 ms TTFT meets 200 ms
    assert (out["ttft_mean_ms"], out["ttft_p50_ms"]) == (200.0, 200.0)
    assert (out["ttft_p90_ms"], out["ttft_p99_ms"]) == (280.0, 298.0)
    # TPOT leaves the one-token request out; ITL pools every gap; E2EL is send -> last token.
    assert out["tpot_mean_ms"] == out["tpot_p99_ms"] == 100.0
    assert (out["itl_mean_ms"], out["itl_p50_ms"]) == (75.0, 50.0)  # 0, 100, 200 and 0
    assert out["e2el_mean_ms"] == 350.0


def test_goodput_counts_a_one_token_tpot_as_met() -> None:
    out = summarize(_records(), 2.0, goodput={"tpot_ms": 50.0})
    assert out["request_goodput"] == 0.5  # the 1-token request (TPOT 0); 100 ms > 50 ms
    both = summarize(_records(), 2.0, goodput={"tpot_ms": 50.0, "ttft_ms": 200.0})
    assert both["request_goodput"] == 0.0


def test_no_success_gives_zeros_not_errors() -> None:
    out = summarize([StreamTimer("text", 0.0).fail("x")], 1.0)
    assert out["completed"] == 0 and out["ttft_p99_ms"] == 0.0 and "request_goodput" not in out


def test_by_kind_and_request_kind() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:"}}
    video = {"type": "video_url", "video_url": {"url": "data:"}}
    text = {"type": "text", "text": "hi"}
    assert request_kind({"messages": [{"role": "user", "content": "hi"}]}) == "text"
    assert request_kind({"messages": [{"role": "user", "content": [image, text]}]}) == "image"
    assert request_kind({"messages": [{"role": "user", "content": [image, video]}]}) == "video"
    rows = summarize_by_kind(_records())
    assert rows["text"]["completed"] == 2 and rows["image"]["completed"] == 0
    assert rows["text"]["e2el_p50_ms"] == 350.0


@pytest.mark.parametrize("bad", ["ttft=500", "ttft_ms", "tpot_ms=0", "foo_ms=3"])
def test_parse_goodput(bad: str) -> None:
    assert parse_goodput(["ttft_ms=500", "tpot_ms=50"]) == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput([bad])


def test_trace_is_one_json_line_per_request(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    write_trace(path, _records())
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["tpot_s"] == pytest.approx(0.1)
    assert rows[2] == {**rows[2], "success": False, "error": "HTTP 503", "kind": "image"}
