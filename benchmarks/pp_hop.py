"""One pipeline hop of hidden states between two Ray actors: object store vs direct transport.

Modes (each on its own pair of actors, timed interleaved, medians over repeats):
  object_store  stage A returns the tensor, stage B takes the ObjectRef (today's default hop);
  ray_rdt       the same call with Ray's `tensor_transport` ("gloo" on CPU, "nccl" on CUDA, after
                `ray.experimental.collective.create_collective_group`);
  p2p           the engine's P2PTransport (torch.distributed isend/recv, gloo or NCCL) inside the
                two actors: A sends, B receives; only two small calls go through Ray.
Every mode's time includes its two Ray calls (A then B, B's result awaited). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from typing import Any

import torch

from internvl_core.engine.stage_transport import P2PTransport

MODES = ("object_store", "ray_rdt", "p2p")
DEFAULT_SHAPES = "64x4096,256x4096,8192x8192"


class HopActor:
    """Holds one hidden-state tensor; emits it by return value or by P2P send."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.tensor: torch.Tensor | None = None
        self.transport: P2PTransport | None = None

    def address(self) -> str:
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def link(self, init_method: str, rank: int) -> None:
        self.transport = P2PTransport(
            rank=rank, world_size=2, init_method=init_method, device=self.device
        )

    def hold(self, rows: int, cols: int) -> None:
        self.tensor = torch.randn(rows, cols, device=self.device)  # [T, D]

    def emit(self) -> torch.Tensor:
        assert self.tensor is not None
        return self.tensor

    def send(self) -> None:
        assert self.transport is not None and self.tensor is not None
        self.transport.send(self.tensor)

    def take(self, hidden: torch.Tensor) -> float:
        return float(hidden[-1, -1])  # a read forces the copy (and a CUDA sync)

    def recv(self, rows: int, cols: int) -> float:
        assert self.transport is not None
        return self.take(self.transport.recv(rows, cols, torch.float32))


def _pairs(
    device: str, modes: tuple[str, ...], gpus_per_actor: float
) -> dict[str, tuple[Any, Any]]:
    import ray
    from ray.experimental.collective import create_collective_group

    num_gpus = gpus_per_actor if device == "cuda" else 0
    actor_cls = ray.remote(num_cpus=0, num_gpus=num_gpus, enable_tensor_transport=True)(HopActor)
    pairs = {mode: (actor_cls.remote(device), actor_cls.remote(device)) for mode in modes}
    if "ray_rdt" in pairs:
        create_collective_group(list(pairs["ray_rdt"]), backend=_rdt_backend(device))
    if "p2p" in pairs:
        first, second = pairs["p2p"]
        init_method = ray.get(first.address.remote())
        ray.get([first.link.remote(init_method, 0), second.link.remote(init_method, 1)])
    return pairs


def _rdt_backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def _hop(mode: str, pair: tuple[Any, Any], rows: int, cols: int, device: str) -> float:
    import ray

    first, second = pair
    start = time.perf_counter()
    if mode == "object_store":
        value = ray.get(second.take.remote(first.emit.remote()))
    elif mode == "ray_rdt":
        ref = first.emit.options(tensor_transport=_rdt_backend(device)).remote()
        value = ray.get(second.take.remote(ref))
    else:
        first.send.remote()
        value = ray.get(second.recv.remote(rows, cols))
    elapsed = time.perf_counter() - start
    assert value == value, "hop returned NaN"
    return elapsed * 1e3


def measure(
    shapes: list[tuple[int, int]],
    *,
    device: str = "cpu",
    modes: tuple[str, ...] = MODES,
    repeats: int = 5,
    big_repeats: int = 3,
    gpus_per_actor: float = 1.0,
) -> dict[str, Any]:
    """Median ms per hop for every (shape, mode), on a Ray cluster already initialised.

    On CUDA each actor of a pair needs its own GPU for P2P (NCCL refuses one GPU twice); with
    `gpus_per_actor=0.5` both share one GPU, which suits the object store only."""
    pairs = _pairs(device, modes, gpus_per_actor)
    out: dict[str, Any] = {}
    import ray

    for rows, cols in shapes:
        ray.get([a.hold.remote(rows, cols) for pair in pairs.values() for a in pair])
        big = rows * cols * 4 >= 64 << 20
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for mode in modes:  # warm-up
            _hop(mode, pairs[mode], rows, cols, device)
        for _ in range(big_repeats if big else repeats):
            for mode in modes:  # interleaved A/B
                times[mode].append(_hop(mode, pairs[mode], rows, cols, device))
        key = f"{rows}x{cols}_fp32"
        out[key] = {f"{mode}_ms": round(statistics.median(t), 2) for mode, t in times.items()}
        out[key]["mib"] = round(rows * cols * 4 / 2**20, 1)
        if "object_store" in modes and "p2p" in modes:
            ratio = out[key]["object_store_ms"] / out[key]["p2p_ms"]
            out[key]["p2p_speedup"] = round(ratio, 2)
    for pair in pairs.values():
        for actor in pair:
            ray.kill(actor)
    return out


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        rows, cols = item.lower().split("x")
        shapes.append((int(rows), int(cols)))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="rows x cols, comma separated")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--big-repeats", type=int, default=3, help="for tensors >= 64 MiB")
    opts = parser.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = measure(
            parse_shapes(opts.shapes),
            device=opts.device,
            modes=tuple(opts.modes.split(",")),
            repeats=opts.repeats,
            big_repeats=opts.big_repeats,
        )
    finally:
        ray.shutdown()
    if opts.device == "cuda":
        out["device"] = f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        out["device"] = f"cpu: {platform.machine()}, {os.cpu_count()} cores"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
