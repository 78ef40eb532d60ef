"""Test support: the transformers-native InternVL model built from an original-format checkpoint.

Converts original keys (spec section 4) to `InternVLForConditionalGeneration` names (spec section 5)
independently of our loaders, so end-to-end tests compare against code we did not write.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    Phi3Config,
    Qwen2Config,
)

# Original InternViT / mlp1 names -> transformers' InternVLModel names (spec section 5 renames).
_VISION_RENAMES = [
    (r"^vision_model\.", "vision_tower."),
    (r"\.class_embedding$", ".cls_token"),
    (r"\.position_embedding$", ".position_embeddings"),
    (r"\.patch_embedding\.", ".patch_embeddings.projection."),
    (r"\.layers\.", ".layer."),
    (r"\.ls1$", ".lambda_1"),
    (r"\.ls2$", ".lambda_2"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"^mlp1\.0\.", "multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "multi_modal_projector.linear_2."),
]


def hf_vision_keys(
    tensors: dict[str, torch.Tensor], *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """`vision_model.*` and `mlp1.*` tensors under InternVLModel names (+ `prefix`); the packed
    `attn.qkv` rows are split into q/k/v. Other keys are ignored."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(("vision_model.", "mlp1.")):
            continue
        for pattern, repl in _VISION_RENAMES:
            key = re.sub(pattern, repl, key)
        key = prefix + key
        if ".qkv." in key:
            for name, part in zip("qkv", tensor.chunk(3, dim=0), strict=True):  # [C, ...] each
                out[key.replace(".qkv.", f".{name}_proj.")] = part
        else:
            out[key] = tensor
    return out


def _internlm2_to_llama(
    sd: dict[str, torch.Tensor], llm: dict, num_layers: int
) -> dict[str, torch.Tensor]:
    heads, kv_heads = llm["num_attention_heads"], llm["num_key_value_heads"]
    dim = llm["hidden_size"]
    head_dim, group = dim // heads, heads // kv_heads
    out = {
        "model.language_model.embed_tokens.weight": sd[
            "language_model.model.tok_embeddings.weight"
        ],
        "model.language_model.norm.weight": sd["language_model.model.norm.weight"],
        "lm_head.weight": sd["language_model.output.weight"],
    }
    for i in range(num_layers):
        src, dst = f"language_model.model.layers.{i}.", f"model.language_model.layers.{i}."
        packed = sd[src + "attention.wqkv.weight"].view(kv_heads, group + 2, head_dim, dim)
        out[dst + "self_attn.q_proj.weight"] = packed[:, :group].reshape(heads * head_dim, dim)
        out[dst + "self_attn.k_proj.weight"] = packed[:, group].reshape(kv_heads * head_dim, dim)
        out[dst + "self_attn.v_proj.weight"] = packed[:, group + 1].reshape(
            kv_heads * head_dim, dim
        )
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attention.wo.weight"]
        out[dst + "mlp.gate_proj.weight"] = sd[src + "feed_forward.w1.weight"]
        out[dst + "mlp.up_proj.weight"] = sd[src + "feed_forward.w3.weight"]
        out[dst + "mlp.down_proj.weight"] = sd[src + "feed_forward.w2.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
    return out


def _text_config(llm: dict) -> Qwen2Config | LlamaConfig | Phi3Config:
    arch = llm["architectures"][0]
    common = {
        "hidden_size": llm["hidden_size"],
        "num_hidden_layers": llm["num_hidden_layers"],
        "num_attention_heads": llm["num_attention_heads"],
        "num_key_value_heads": llm.get("num_key_value_heads", llm["num_attention_heads"]),
        "intermediate_size": llm["intermediate_size"],
        "vocab_size": llm["vocab_size"],
        "rms_norm_eps": llm.get("rms_norm_eps", 1e-6),
        "max_position_embeddings": llm["max_position_embeddings"],
        "tie_word_embeddings": False,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    theta = llm.get("rope_theta", 10000.0)
    if arch == "Qwen2ForCausalLM":
        return Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": theta})
    if arch == "Phi3ForCausalLM":
        scaling = llm["rope_scaling"]
        return Phi3Config(
            **common,
            original_max_position_embeddings=llm["original_max_position_embeddings"],
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": theta,
                "short_factor": list(scaling["short_factor"]),
                "long_factor": list(scaling["long_factor"]),
                "original_max_position_embeddings": llm["original_max_position_embeddings"],
            },
        )
    # Llama and InternLM2 (converted to Llama): dynamic NTK is a no-op below max positions.
    return LlamaConfig(
        **common,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )


def build_hf_internvl(path: Path, image_token_id: int) -> InternVLForConditionalGeneration:
    """The HF-native model with the checkpoint's weights, fp32, eval mode."""
    raw = json.loads((path / "config.json").read_text())
    sd = load_file(str(path / "model.safetensors"))
    sd = {k: v.float() for k, v in sd.items()}
    vraw, llm = raw["vision_config"], raw["llm_config"]
    vision = InternVLVisionConfig(
        hidden_size=vraw["hidden_size"],
        num_hidden_layers=vraw["num_hidden_layers"],
        num_attention_heads=vraw["num_attention_heads"],
        intermediate_size=vraw["intermediate_size"],
        image_size=raw["force_image_size"],
        patch_size=vraw["patch_size"],
        use_qk_norm=vraw["qk_normalization"],
        attention_bias=vraw["qkv_bias"],
        norm_type=vraw["norm_type"],
        layer_norm_eps=vraw.get("layer_norm_eps", 1e-6),
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=_text_config(llm),
        image_token_id=image_token_id,
        image_seq_length=int((raw["force_image_size"] // vraw["patch_size"]) ** 2 / 4),
        downsample_ratio=raw["downsample_ratio"],
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config).eval()
    state = hf_vision_keys(sd, prefix="model.")
    if llm["architectures"][0] == "InternLM2ForCausalLM":
        state.update(_internlm2_to_llama(sd, llm, llm["num_hidden_layers"]))
    else:
        for key, value in sd.items():
            if key.startswith("language_model.model."):
                state["model.language_model." + key[len("language_model.model.") :]] = value
            elif key == "language_model.lm_head.weight":
                state["lm_head.weight"] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if "inv_freq" not in m], missing
    return model


@torch.inference_mode()
def hf_greedy(
    model: InternVLForConditionalGeneration,
    input_ids: list[int],
    pixel_values: torch.Tensor | None,
    *,
    eos_token_id: int,
    max_new_tokens: int,
) -> list[int]:
    """HF generate, greedy, stopping at the template separator only (as chat() configures it)."""
    ids = torch.tensor([input_ids])
    extra = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        **extra,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return out[0, ids.shape[1] :].tolist()
