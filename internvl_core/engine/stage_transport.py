"""Hidden states between pipeline stages by torch.distributed point-to-point (gloo on CPU, NCCL on
CUDA), so a PP hop never goes through Ray's object store.

In: this stage's rank and the rendezvous address (every stage is one process). Out: `send` of a
stage's [num_tokens, D] hidden states to rank + 1, `recv` of them on rank + 1.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# A stage waiting on its predecessor longer than this is stuck (the engine fails the replica).
P2P_TIMEOUT_S = 300.0


def p2p_backend(device: torch.device) -> str:
    """gloo for CPU tensors, NCCL for CUDA tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


class P2PTransport:
    """One stage's end of the stage-to-stage link; the process group is this process's default.

    Sends are asynchronous (`isend`) so a stage returns as soon as its output is queued; the
    tensor is kept alive until the next send, which first waits for the previous one. A stage
    receives in the order its predecessor sends, which holds because every stage runs batches in
    submission order.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        init_method: str,
        device: torch.device,
        timeout_s: float = P2P_TIMEOUT_S,
    ) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        backend = p2p_backend(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        logger.info("stage %d/%d linked by %s at %s", rank, world_size, backend, init_method)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def send(self, hidden: torch.Tensor) -> None:
        """Queue `hidden` [T, D] for rank + 1."""
        assert not self.is_last, "the last stage sends nothing"
        self.wait_sent()
        hidden = hidden.contiguous()  # [T, D]
        work = dist.isend(hidden, dst=self.rank + 1)
        assert work is not None
        self._pending = (work, hidden)

    def recv(self, num_tokens: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Block for rank - 1's next [num_tokens, hidden_size] tensor."""
        assert not self.is_first, "the first stage receives nothing"
        hidden = torch.empty((num_tokens, hidden_size), dtype=dtype, device=self.device)  # [T, D]
        dist.recv(hidden, src=self.rank - 1)
        return hidden

    def wait_sent(self) -> None:
        """Wait for the previous send to complete (then its tensor may be freed)."""
        if self._pending is not None:
            work, _ = self._pending
            self._pending = None
            work.wait()

    def close(self) -> None:
        self.wait_sent()
        if dist.is_initialized():
            dist.destroy_process_group()
