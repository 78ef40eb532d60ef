"""Standard serving metrics from per-request stream timings, as `vllm bench serve` defines them.

In: one `RequestRecord` per request (filled chunk by chunk by `StreamTimer` from the SSE payloads)
and the run's wall time. Out: TTFT, TPOT, ITL and end-to-end latency (mean, p50, p90, p99 in
ms), request / output-token / total-token throughput, goodput under latency targets, and a JSONL
trace of the records. Pure Python + numpy: `tests/test_serving_metrics.py` imports it.
"""

# follows https://github.com/vllm-project/vllm/blob/main/vllm/benchmarks/serve.py
# (calculate_metrics) and vllm/benchmarks/lib/endpoint_request_func.py (which chunks count).

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
# `--goodput` keys -> the per-request value each target bounds (all in milliseconds).
GOODPUT_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


@dataclass(slots=True)
class RequestRecord:
    """Client-side timings of one streamed chat completion (seconds)."""

    kind: str  # text / image / video: what the request carries
    start_s: float  # send time, from the start of the run
    success: bool = False
    error: str | None = None
    ttft_s: float = 0.0  # send -> first chunk with choices
    itl_s: list[float] = field(default_factory=list)  # gaps between chunks with choices
    latency_s: float = 0.0  # send -> last chunk with choices (E2EL)
    prompt_tokens: int = 0
    output_tokens: int = 0  # the final usage chunk's completion_tokens

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first; 0 for one token (vLLM: counts as met)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tpot_s": self.tpot_s}


def request_kind(body: dict[str, Any]) -> str:
    """`video` if any message part is a video, else `image` if any is an image, else `text`."""
    kinds = {
        part.get("type")
        for message in body.get("messages", [])
        if isinstance(message.get("content"), list)
        for part in message["content"]
    }
    if "video_url" in kinds:
        return "video"
    return "image" if "image_url" in kinds else "text"


class StreamTimer:
    """Builds a RequestRecord from the SSE data payloads of one response as they arrive.

    As `vllm bench serve`: every chunk with a non-empty `choices` list is a token chunk (the
    role chunk too: servers send it with the first token); its arrival gives TTFT, the gaps
    between them ITL (one gap per chunk, however many tokens it carries), the last one E2EL.
    Token counts come from `usage` (request it with `stream_options.include_usage`).
    """

    def __init__(self, kind: str, start_s: float) -> None:
        self.record = RequestRecord(kind=kind, start_s=start_s)
        self._start = start_s
        self._last: float | None = None

    def on_payload(self, payload: dict[str, Any], now_s: float) -> None:
        """One `data:` JSON payload, received at `now_s` (same clock as `start_s`)."""
        record = self.record
        if "error" in payload:
            record.error = str(payload["error"].get("message", payload["error"]))
        if payload.get("choices"):
            if self._last is None:
                record.ttft_s = now_s - self._start
            else:
                record.itl_s.append(now_s - self._last)
            self._last = now_s
        usage = payload.get("usage")
        if usage:
            record.prompt_tokens = int(usage.get("prompt_tokens", 0))
            record.output_tokens = int(usage.get("completion_tokens", 0))

    def finish(self) -> RequestRecord:
        """The record once the stream ended: a success iff a token chunk came and no error."""
        record = self.record
        if self._last is None:
            record.error = record.error or "no chunk with choices arrived"
        else:
            record.latency_s = self._last - self._start
        record.success = record.error is None
        return record

    def fail(self, error: str) -> RequestRecord:
        self.record.error = error
        self.record.success = False
        return self.record


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """`["ttft_ms=500", "tpot_ms=50"]` -> {"ttft_ms": 500.0, "tpot_ms": 50.0}."""
    targets: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in GOODPUT_KEYS:
            raise ValueError(f"--goodput takes KEY=MS with KEY in {GOODPUT_KEYS}; got {item!r}")
        targets[key] = float(value)
        if targets[key] <= 0:
            raise ValueError(f"--goodput {key} must be > 0 ms; got {value}")
    return targets


def _stats_ms(name: str, values_s: Sequence[float]) -> dict[str, float]:
    """mean and percentiles in ms; 0 for no values (as vLLM: `np.mean(values or 0)`)."""
    array = np.asarray(values_s or [0.0], dtype=np.float64) * 1e3
    out = {f"{name}_mean_ms": float(array.mean())}
    for q in PERCENTILES:
        out[f"{name}_p{q}_ms"] = float(np.percentile(array, q))
    return out


def _is_good(record: RequestRecord, targets: dict[str, float]) -> bool:
    values_ms = {
        "ttft_ms": record.ttft_s * 1e3,
        "tpot_ms": record.tpot_s * 1e3,
        "e2el_ms": record.latency_s * 1e3,
    }
    return all(values_ms[key] <= limit for key, limit in targets.items())


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    goodput: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The standard metrics over `records` served in `duration_s` of wall time.

    TPOT statistics leave out single-token requests (vLLM); goodput counts a single-token
    request's TPOT as 0. Throughputs count successful requests only.
    """
    done = [r for r in records if r.success]
    num_input = sum(r.prompt_tokens for r in done)
    num_output = sum(r.output_tokens for r in done)
    out: dict[str, Any] = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": round(duration_s, 3),
        "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "request_throughput": len(done) / duration_s,
        "output_throughput": num_output / duration_s,
        "total_token_throughput": (num_input + num_output) / duration_s,
    }
    if goodput:
        out["goodput_targets"] = dict(goodput)
        out["request_goodput"] = sum(_is_good(r, goodput) for r in done) / duration_s
    out |= _stats_ms("ttft", [r.ttft_s for r in done])
    out |= _stats_ms("tpot", [r.tpot_s for r in done if r.output_tokens > 1])
    out |= _stats_ms("itl", [gap for r in done for gap in r.itl_s])
    out |= _stats_ms("e2el", [r.latency_s for r in done])
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def summarize_by_kind(records: Sequence[RequestRecord]) -> dict[str, dict[str, Any]]:
    """Latency percentiles per request kind (text / image / video) of the successful ones."""
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({r.kind for r in records}):
        mine = [r for r in records if r.kind == kind and r.success]
        row: dict[str, Any] = {"completed": len(mine)}
        for name, values in (
            ("ttft", [r.ttft_s for r in mine]),
            ("tpot", [r.tpot_s for r in mine if r.output_tokens > 1]),
            ("e2el", [r.latency_s for r in mine]),
        ):
            stats = _stats_ms(name, values)
            row |= {k: round(v, 2) for k, v in stats.items() if "_p50_" in k or "_p99_" in k}
        out[kind] = row
    return out


def write_trace(path: str | Path, records: Iterable[RequestRecord]) -> None:
    """One JSON object per request and line (the RequestRecord fields plus tpot_s)."""
    with Path(path).open("w") as trace:
        for record in records:
            trace.write(json.dumps(record.to_json()) + "\n")
