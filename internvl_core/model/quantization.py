"""bitsandbytes quantization of a decoder layer's linear layers (8-bit LLM.int8 or 4-bit nf4).

Takes a loaded full-precision nn.Linear and returns the bitsandbytes module holding the quantized
weight on the target device (CPU or CUDA). Embeddings, norms and the LM head stay unquantized, as
transformers' `load_in_8bit` / `load_in_4bit` leave them.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from internvl_core.errors import CheckpointError

logger = logging.getLogger(__name__)

QuantizationMode = Literal["8bit", "4bit"]
QUANTIZATION_MODES: tuple[str, ...] = ("8bit", "4bit")

# Linear submodules of our DecoderLayer that get quantized.
QUANTIZED_LINEARS: tuple[str, ...] = (
    "self_attn.qkv_proj",
    "self_attn.o_proj",
    "mlp.gate_up_proj",
    "mlp.down_proj",
)

# transformers' BitsAndBytesConfig defaults (llm_int8_threshold), which `load_in_8bit=True` uses.
INT8_THRESHOLD = 6.0


def quantize_linear(
    linear: nn.Linear,
    mode: QuantizationMode,
    *,
    device: torch.device | str,
    compute_dtype: torch.dtype,
) -> nn.Module:
    """A bitsandbytes Linear8bitLt / Linear4bit (nf4) with `linear`'s weight and bias."""
    import bitsandbytes as bnb  # imported lazily: optional at runtime, heavy at import

    # bitsandbytes quantizes while a parameter moves from the CPU to the target device.
    weight = linear.weight.detach().to("cpu")  # [out, in]
    bias = None if linear.bias is None else linear.bias.detach().to(device=device)  # [out]
    if mode == "8bit":
        module: nn.Module = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    elif mode == "4bit":
        module = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        raise CheckpointError(f"quantization is {mode!r}; supported: {QUANTIZATION_MODES}")
    if bias is not None:
        module.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    return module.to(device)


def quantize_layer(
    layer: nn.Module,
    mode: QuantizationMode,
    *,
    device: torch.device | str,
    compute_dtype: torch.dtype,
) -> None:
    """Replace the QUANTIZED_LINEARS of a loaded decoder layer by bitsandbytes modules, in place."""
    for name in QUANTIZED_LINEARS:
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name)
        linear = getattr(parent, child)
        assert isinstance(linear, nn.Linear), f"{name} is already quantized"
        setattr(
            parent,
            child,
            quantize_linear(linear, mode, device=device, compute_dtype=compute_dtype),
        )
