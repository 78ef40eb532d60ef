"""Build and load the project's C++ CPU kernels (kernels/*.cpp) as torch custom ops, on first use.

The source is compiled once per machine with the system C++ compiler against torch's own headers
and libraries (no ninja, no extra package) into a cache folder keyed by the source, torch version
and CPU flags, then loaded with `torch.ops.load_library`. Concurrent builders (several Ray workers
on one node) each write their own temporary file and rename it into place, so they never load a
half-written library. Without a compiler, or with INTERNVL_CPU_KERNELS=0, `load_cpu_kernels`
returns False and callers keep their pure-torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).with_name("kernels")
SOURCES = ("paged_attention_cpu.cpp",)
ENV_SWITCH = "INTERNVL_CPU_KERNELS"  # "0" turns the kernels off
_LOCK = threading.Lock()
_STATE: dict[str, bool] = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "internvl-serve" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return sys.platform


def _compile_command(source: Path, target: Path) -> list[str]:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    lib_dirs = cpp_extension.library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        os.environ.get("CXX", "g++"),
        "-O3",
        "-march=native",
        "-fopenmp",  # the pragmas; the runtime is torch's own libgomp (linked below)
        "-shared",
        "-fPIC",
        "-std=c++17",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *includes,
        f"-I{sysconfig.get_paths()['include']}",
        str(source),
        "-o",
        str(target),
        *[f"-L{p}" for p in lib_dirs],
        *[f"-Wl,-rpath,{p}" for p in lib_dirs],
        "-lc10",
        "-ltorch_cpu",
        "-lgomp",
    ]


def _build(name: str) -> Path:
    source = KERNEL_DIR / name
    digest = hashlib.sha256(
        source.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    logger.info("compiling CPU kernel %s (once per machine) -> %s", name, target)
    try:
        proc = subprocess.run(
            _compile_command(source, Path(tmp)), capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-5:])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_cpu_kernels() -> bool:
    """Compile (first time) and load every kernel; True when `torch.ops.internvl_cpu` is ready."""
    with _LOCK:
        if "loaded" in _STATE:
            return _STATE["loaded"]
        ok = False
        if os.environ.get(ENV_SWITCH, "1") == "0":
            logger.info("CPU kernels off (%s=0): pure-torch attention", ENV_SWITCH)
        elif shutil.which(os.environ.get("CXX", "g++")) is None:
            logger.warning("no C++ compiler found: CPU kernels off, pure-torch attention")
        else:
            try:
                for name in SOURCES:
                    torch.ops.load_library(str(_build(name)))
                _register_fakes()
                ok = True
            except Exception as exc:  # a broken toolchain must not stop the server
                logger.warning("CPU kernels unavailable (%s): pure-torch attention", exc)
        _STATE["loaded"] = ok
        return ok


def kernels_loaded() -> bool:
    """Whether `load_cpu_kernels` has loaded them (no build, no lock: safe in traced code)."""
    return _STATE.get("loaded", False)


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile traces through the ops without running them."""

    @torch.library.register_fake("internvl_cpu::paged_attention")
    def _paged_attention(q, kv_cache, block_tables, query_start, query_lens, seq_lens, scale, out):
        return None


if __name__ == "__main__":  # `python -m internvl_core.model.cpu_kernels`: build now (make install)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("CPU kernels %s", "ready" if load_cpu_kernels() else "off (pure-torch attention)")
