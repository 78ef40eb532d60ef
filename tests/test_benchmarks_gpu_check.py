"""benchmarks/gpu_check.py cannot rot: its CPU dry run (tiny shapes) runs every section and
reports no section error; the Ray hop section runs in a subprocess, as the script is used."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _errors(out: dict[str, Any]) -> list[str]:
    found = []
    for key, value in out.items():
        if isinstance(value, dict):
            found += [f"{key}: {e}" for e in _errors(value)]
        elif key == "error":
            found.append(str(value))
    return found


def test_dry_run_without_ray(capsys: pytest.CaptureFixture[str]) -> None:
    _load().main(["--device", "cpu", "--dry-run", "--sections", "attention,decoder,kv"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert _errors(out) == []
    assert out["dry_run"] is True and out["device"].startswith("cpu")
    names = {
        f"tiny_{case}_{impl}"
        for case in ("decode", "chunked_prefill")
        for impl in ("sdpa", "fused")
    }
    assert names <= set(out["attention"])
    assert out["attention"]["tiny_decode_fused"]["max_abs_diff_vs_first"] <= 1e-5
    assert {"eager_bs1", "eager_bs4"} <= set(out["decoder"])
    assert out["kv"]["num_blocks"] > 0 and out["kv"]["fill"]["ok"] is True
    assert (
        out["kv"]["fill"]["cached_tokens"] + out["kv"]["fill"]["num_seqs"]
        == (out["kv"]["max_concurrent_tokens"])
    ), "the fill decode uses every slot of the pool"


@pytest.mark.serve
@pytest.mark.slow
def test_dry_run_script_with_pp_hop() -> None:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--dry-run", "--sections", "pp_hop"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=True,
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert _errors(out) == []
    assert out["pp_hop"]["4x64_fp32"]["p2p_ms"] > 0
