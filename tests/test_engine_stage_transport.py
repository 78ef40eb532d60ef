"""P2PTransport: hidden states of any shape and dtype arrive intact, in send order, between two
processes (gloo on CPU; NCCL between two GPUs in the gpu test)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from internvl_core.engine.stage_transport import P2PTransport, p2p_backend

SHAPES = [(1, 64), (7, 64), (256, 4096), (3, 8)]


def _address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def _expected(index: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(rows * cols, dtype=torch.float32).view(rows, cols) + index).to(dtype)


def _stage(rank: int, init_method: str, device_type: str, ok: object) -> None:
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    transport = P2PTransport(
        rank=rank, world_size=2, init_method=init_method, device=device, timeout_s=60
    )
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for index, (rows, cols) in enumerate(SHAPES):
                if transport.is_first:
                    transport.send(_expected(index, rows, cols, dtype).to(device))
                    continue
                got = transport.recv(rows, cols, dtype)
                assert got.device == device and got.dtype == dtype
                torch.testing.assert_close(got.cpu(), _expected(index, rows, cols, dtype))
        ok.value = 1  # type: ignore[attr-defined]
    finally:
        transport.close()


def _run_pair(device_type: str) -> None:
    ctx = mp.get_context("spawn")
    init_method = _address()
    flags = [ctx.Value("i", 0) for _ in range(2)]
    procs = [
        ctx.Process(target=_stage, args=(rank, init_method, device_type, flags[rank]))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0, f"stage process exited with {proc.exitcode}"
    assert [f.value for f in flags] == [1, 1]


def test_backend_follows_the_device() -> None:
    assert p2p_backend(torch.device("cpu")) == "gloo"
    assert p2p_backend(torch.device("cuda", 1)) == "nccl"


@pytest.mark.slow  # two spawned torch processes
def test_gloo_pair_delivers_in_order() -> None:
    _run_pair("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL P2P needs two GPUs")
def test_nccl_pair_delivers_in_order() -> None:
    _run_pair("cuda")
