"""Where a replica runs its model: CUDA when Ray gave it a GPU and torch sees one, else CPU.

`dtype: auto` is bfloat16 on CUDA and float32 on CPU (CPU bf16 matmuls are slow and inexact).
"""

from __future__ import annotations

import ray
import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def assigned_gpu() -> bool:
    """True when this process was given a GPU by Ray and CUDA is usable."""
    if not torch.cuda.is_available():
        return False
    if not ray.is_initialized():
        return True
    return bool(ray.get_gpu_ids())


def resolve_device(dtype: str) -> tuple[str, torch.dtype]:
    """(device, torch dtype) for this replica from ServeArgs.dtype."""
    device = "cuda" if assigned_gpu() else "cpu"
    if dtype == "auto":
        return device, torch.bfloat16 if device == "cuda" else torch.float32
    return device, _DTYPES[dtype]
