"""CPU float32 linears with oneDNN pre-packed weights (the layout its GEMM wants, made once).

`torch.nn.functional.linear` re-lays the weight out on every call; oneDNN's `_linear_pointwise`
over a weight reordered once at load (`_reorder_linear_weight`, tuned for ~32 rows) measured
15-45% less time per call on this project's shapes at 1..1024 rows (the decode batches and
prefill chunks of a 768-wide model; `benchmarks/compile.py` and the peer comparison in the
closing notes), which is how vLLM's CPU backend runs its linears too.

`prepack_linears(model)` swaps every plain `nn.Linear` of a CPU float32 model for a
`PackedLinear` that keeps the original `weight`/`bias` parameters (state dicts, tied heads and
tests see them unchanged) plus the packed copy, so linear weights take twice their memory on the
CPU. Quantized layers (bitsandbytes subclasses) are left alone. Under `torch.compile` the packed
op is skipped (inductor packs by itself with freezing), so traced graphs stay plain.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ENV_SWITCH = "INTERNVL_CPU_PREPACK"  # "0" keeps plain linears
BATCH_HINT = 32  # rows oneDNN tunes the packed layout for (vLLM uses the same)


class PackedLinear(nn.Module):
    """y = x W^T + b through oneDNN with W pre-packed: x [N, in] -> [N, out]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # [out, in], shared with the original (tied heads stay tied)
        self.bias = linear.bias  # [out] or None
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or x.shape[0] == 0:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def can_prepack(model: nn.Module) -> bool:
    params = list(model.parameters())
    return (
        os.environ.get(ENV_SWITCH, "1") != "0"
        and torch.backends.mkldnn.is_available()
        and bool(params)
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    )


def prepack_linears(model: nn.Module) -> int:
    """Swap the plain `nn.Linear`s of a loaded CPU float32 `model` for `PackedLinear`s (in place);
    returns how many were swapped (0 when the model does not qualify)."""
    if not can_prepack(model):
        return 0
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear  # not bitsandbytes' subclasses
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    logger.info("oneDNN pre-packed %d CPU float32 linears", len(targets))
    return len(targets)
