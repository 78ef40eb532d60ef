"""bitsandbytes 8-bit / 4-bit (nf4) decoder linears on CPU; bf16 / fp16 loads; vs fp32 logits."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from internvl_core.config import LLMArchitecture
from internvl_core.errors import CheckpointError
from internvl_core.model.attention_metadata import AttentionMetadata
from internvl_core.model.decoder import DecoderModel
from internvl_core.model.quantization import QUANTIZED_LINEARS, quantize_linear

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS = 64, 4, 2, 16, 128, 512, 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LLMArchitecture]:
    """A tiny random Qwen2-layout checkpoint (q/k/v biases, so biased quantized linears too)."""
    raw = {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": INTER,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 4096,
    }
    gen = torch.Generator().manual_seed(0)
    kv_rows = KV_HEADS * HEAD_DIM
    shapes = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (kv_rows, HIDDEN),
        "self_attn.v_proj.weight": (kv_rows, HIDDEN),
        "self_attn.q_proj.bias": (HIDDEN,),
        "self_attn.k_proj.bias": (kv_rows,),
        "self_attn.v_proj.bias": (kv_rows,),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTER, HIDDEN),
        "mlp.up_proj.weight": (INTER, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTER),
    }
    state = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen),
        "lm_head.weight": 0.1 * torch.randn(VOCAB, HIDDEN, generator=gen),
        "model.norm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=gen),
    }
    for i in range(LAYERS):
        for name, shape in shapes.items():
            state[f"model.layers.{i}.{name}"] = 0.1 * torch.randn(shape, generator=gen)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{norm}.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=gen)
    path = tmp_path_factory.mktemp("qwen2_tiny")
    save_file({"language_model." + k: v for k, v in state.items()}, str(path / "model.safetensors"))
    return path, LLMArchitecture.parse(raw)


@torch.inference_mode()
def _prefill_logits(model: DecoderModel) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1))
    caches = model.allocate_kv_caches(2, 16)
    attn = AttentionMetadata.for_contiguous([24], [24], [[0, 1]], 16)
    hidden = model(model.embed_tokens(ids), torch.arange(24), caches, attn)  # [T, D]
    return model.compute_logits(hidden)  # [T, V]


def _load(
    checkpoint: tuple[Path, LLMArchitecture], dtype: torch.dtype, quantization: str | None = None
) -> DecoderModel:
    path, arch = checkpoint
    return DecoderModel.from_checkpoint(path, dtype=dtype, quantization=quantization, arch=arch)


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of logit rows [T, V], averaged over tokens."""
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


@pytest.mark.parametrize(
    ("mode", "module_type", "min_cosine"),
    [("8bit", bnb.nn.Linear8bitLt, 0.999), ("4bit", bnb.nn.Linear4bit, 0.99)],
)
def test_quantized_logits_close_to_fp32(
    checkpoint, mode: str, module_type: type, min_cosine: float
) -> None:
    reference = _prefill_logits(_load(checkpoint, torch.float32))
    model = _load(checkpoint, torch.float32, mode)
    for layer in model.layers:
        for name in QUANTIZED_LINEARS:
            assert isinstance(layer.get_submodule(name), module_type), name
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32
    logits = _prefill_logits(model)
    assert torch.isfinite(logits).all()
    assert _mean_cosine(logits, reference) > min_cosine
    assert not torch.equal(logits, reference)


def test_quantized_with_bf16_compute_runs(checkpoint) -> None:
    reference = _prefill_logits(_load(checkpoint, torch.float32))
    for mode in ("8bit", "4bit"):
        logits = _prefill_logits(_load(checkpoint, torch.bfloat16, mode))
        assert logits.dtype == torch.float32
        assert _mean_cosine(logits, reference) > 0.98


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_close_to_fp32(checkpoint, dtype: torch.dtype) -> None:
    reference = _prefill_logits(_load(checkpoint, torch.float32))
    model = _load(checkpoint, dtype)
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == dtype
    assert model.allocate_kv_caches(1, 16)[0].dtype == dtype
    logits = _prefill_logits(model)
    assert _mean_cosine(logits, reference) > 0.999


def test_quantize_linear_keeps_bias_and_output(checkpoint) -> None:
    gen = torch.Generator().manual_seed(2)
    linear = nn.Linear(HIDDEN, 32, bias=True)
    with torch.no_grad():
        linear.weight.copy_(0.1 * torch.randn(32, HIDDEN, generator=gen))
        linear.bias.copy_(torch.randn(32, generator=gen))
    x = torch.randn(5, HIDDEN, generator=gen)  # [T, D]
    for mode in ("8bit", "4bit"):
        module = quantize_linear(linear, mode, device="cpu", compute_dtype=torch.float32)
        torch.testing.assert_close(module.bias, linear.bias)
        with torch.inference_mode():
            assert _mean_cosine(module(x), linear(x)) > 0.99


def test_unknown_quantization_is_refused(checkpoint) -> None:
    with pytest.raises(CheckpointError, match="quantization is '3bit'"):
        _load(checkpoint, torch.float32, "3bit")
