"""Decoder building blocks shared by every family: RMSNorm and the gated (SwiGLU) MLP.

Inputs are flattened token rows [num_tokens, hidden]; outputs keep that shape and the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm: statistics in float32, cast back to the input dtype, then scale.

    The cast-before-scale order is the one Llama/Qwen2/InternLM2/Phi-3 use, so bf16 results match.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))  # [D]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden.dtype
        hidden32 = hidden.to(torch.float32)  # [T, D]
        variance = hidden32.pow(2).mean(-1, keepdim=True)  # [T, 1]
        normed = hidden32 * torch.rsqrt(variance + self.eps)  # [T, D]
        return self.weight * normed.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class GatedMLP(nn.Module):
    """`down(silu(gate(x)) * up(x))` with gate and up fused into one `gate_up_proj` [2I, D].

    Row order of `gate_up_proj.weight` is `[gate: I][up: I]` (the Phi-3 layout; the other families'
    separate `gate_proj`/`up_proj` or InternLM2's `w1`/`w3` are concatenated in that order).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(
            hidden_size, 2 * intermediate_size, bias=False, dtype=dtype, device=device
        )
        self.down_proj = nn.Linear(
            intermediate_size, hidden_size, bias=False, dtype=dtype, device=device
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(hidden)  # [T, 2I]
        gate, up = gate_up.split(self.intermediate_size, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)  # [T, D]
