# Over 400 lines: the config.json and spec-4 key tables of four families are one concept.
"""Tiny random-weight InternVL checkpoints in the original format, for tests and the CPU demo.

`make_tiny_checkpoint(out_dir, family=...)` writes `config.json` (as the original
`InternVLChatConfig.to_dict()`), weights under the original keys (spec 4), tokenizer files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import zlib
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors.torch import save_file

from internvl_core.errors import CheckpointError
from internvl_core.testing.tiny_tokenizer import Family, TinyTokenizerSpec, write_tiny_tokenizer

logger = logging.getLogger(__name__)

VitKind = Literal["300m", "6b"]
DtypeName = Literal["float32", "bfloat16", "float16"]
WeightsFormat = Literal["safetensors", "bin"]

VIT_HIDDEN = 32
VIT_HEADS = 2
VIT_INTERMEDIATE = 64
PATCH_SIZE = 14
LLM_HIDDEN = 64
LLM_HEADS = 4
LLM_INTERMEDIATE = 128
LINEAR_STD = 0.02

DEFAULT_TEMPLATES: dict[str, str] = {
    "qwen2": "Hermes-2",
    "internlm2": "internlm2-chat",
    "phi3": "phi3-chat",
    "llama": "internlm2-chat",  # InternVL2-Llama3-76B ships internlm2-chat
}
# Fields of InternVLChatConfig.to_dict() that no argument changes.
_CHAT_CONFIG: dict[str, Any] = {
    "_commit_hash": None,
    "architectures": ["InternVLChatModel"],
    "auto_map": {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
    },
    "downsample_ratio": 0.5,
    "min_dynamic_patch": 1,
    "model_type": "internvl_chat",
    "select_layer": -1,
    "transformers_version": None,
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
}
_WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin*")


def make_tiny_checkpoint(
    out_dir: str | Path,
    *,
    family: Family = "qwen2",
    vit: VitKind = "300m",
    ps_version: Literal["v1", "v2"] = "v2",
    dynamic_image_size: bool = True,
    use_thumbnail: bool = True,
    max_dynamic_patch: int = 12,
    image_size: int = 56,
    num_llm_layers: int = 2,
    num_vit_layers: int = 2,
    dtype: DtypeName = "float32",
    seed: int = 0,
    num_shards: int = 1,
    weights_format: WeightsFormat = "safetensors",
    template: str | None = None,
    system_message: str | None = None,
) -> Path:
    """Write a tiny InternVL checkpoint folder and return its path (rewrites it if present)."""
    _validate(family=family, vit=vit, image_size=image_size, num_shards=num_shards)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = write_tiny_tokenizer(out, family)
    llm_config = _llm_config(family, tok, num_layers=num_llm_layers, dtype=dtype)
    vision_config = _vision_config(
        vit, image_size=image_size, num_layers=num_vit_layers, dtype=dtype
    )
    config = {
        **_CHAT_CONFIG,
        "dynamic_image_size": dynamic_image_size,
        "force_image_size": image_size,
        "llm_config": llm_config,
        "max_dynamic_patch": max_dynamic_patch,
        "ps_version": ps_version,
        "template": template or DEFAULT_TEMPLATES[family],
        "torch_dtype": dtype,
        "use_thumbnail": use_thumbnail,
        "vision_config": vision_config,
    }
    if system_message is not None:
        config["system_message"] = system_message
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shapes = {**vision_shapes(vision_config), **llm_shapes(llm_config)}
    tensors = _random_tensors(shapes, seed=seed, dtype=getattr(torch, dtype))
    _write_weights(out, tensors, num_shards=num_shards, weights_format=weights_format)
    logger.info(
        "wrote tiny %s checkpoint (%s ViT, %d tensors) to %s", family, vit, len(shapes), out
    )
    return out


def _validate(*, family: str, vit: str, image_size: int, num_shards: int) -> None:
    if family not in get_args(Family):
        raise CheckpointError(f"family is {family!r}; supported: {list(get_args(Family))}")
    if vit not in get_args(VitKind):
        raise CheckpointError(f"vit is {vit!r}; supported: {list(get_args(VitKind))}")
    if image_size <= 0 or image_size % (2 * PATCH_SIZE):
        raise CheckpointError(
            f"image_size is {image_size}; must be a positive multiple of {2 * PATCH_SIZE} "
            "(patch 14, pixel shuffle 0.5)"
        )
    if num_shards < 1:
        raise CheckpointError(f"num_shards is {num_shards}; must be at least 1")


def _vision_config(vit: VitKind, *, image_size: int, num_layers: int, dtype: str) -> dict[str, Any]:
    """InternVisionConfig.to_dict() for a 300M-style (LayerNorm) or 6B-style (RMSNorm) tower."""
    big = vit == "6b"
    return {
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": VIT_HIDDEN,
        "image_size": image_size,
        "initializer_factor": 0.1 if big else 1.0,
        "initializer_range": 1e-10 if big else 0.02,
        "intermediate_size": VIT_INTERMEDIATE,
        "layer_norm_eps": 1e-6,
        "model_type": "intern_vit_6b",
        "norm_type": "rms_norm" if big else "layer_norm",
        "num_attention_heads": VIT_HEADS,
        "num_channels": 3,
        "num_hidden_layers": num_layers,
        "patch_size": PATCH_SIZE,
        "qk_normalization": big,
        "qkv_bias": not big,
        "torch_dtype": dtype,
        "use_flash_attn": False,
    }


def _llm_config(
    family: Family, tok: TinyTokenizerSpec, *, num_layers: int, dtype: str
) -> dict[str, Any]:
    """The family's own config.json keys, at tiny width."""
    num_kv_heads = LLM_HEADS if family == "phi3" else 2
    config: dict[str, Any] = {
        "attention_dropout": 0.0,
        # Qwen2's config names <|endoftext|> as bos although its tokenizer never adds one.
        "bos_token_id": tok.token_ids["<|endoftext|>"] if family == "qwen2" else tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": LLM_HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": LLM_INTERMEDIATE,
        "num_attention_heads": LLM_HEADS,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pad_token_id": tok.pad_token_id,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": tok.vocab_size,
    }
    config.update(_FAMILY_CONFIG[family])
    if family == "qwen2":
        config["max_window_layers"] = num_layers
    return config


_HALF_HEAD_DIM = LLM_HIDDEN // LLM_HEADS // 2
# Each family's own config.json keys (beyond the shared ones in _llm_config).
_FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "max_position_embeddings": 32768,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
    },
    "internlm2": {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": False,
        "max_position_embeddings": 32768,
        "pretraining_tp": 1,
        "rope_scaling": {"factor": 2.0, "type": "dynamic"},
        "rope_theta": 1000000,
    },
    "phi3": {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "auto_map": {
            "AutoConfig": "configuration_phi3.Phi3Config",
            "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
        },
        "embd_pdrop": 0.0,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "resid_pdrop": 0.0,
        # Deterministic factors shaped like Phi-3-mini-128k's: short near 1, long growing.
        "rope_scaling": {
            "type": "su",
            "short_factor": [round(1.0 + 0.01 * i, 4) for i in range(_HALF_HEAD_DIM)],
            "long_factor": [round(1.0 + i, 4) for i in range(_HALF_HEAD_DIM)],
        },
        "rope_theta": 10000.0,
        "sliding_window": 262144,
    },
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "rope_theta": 500000.0,
    },
}


def vision_shapes(vision_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Original key names and shapes of the InternViT tower (spec section 4), without mlp1."""
    hidden = vision_config["hidden_size"]
    inner = vision_config["intermediate_size"]
    side = vision_config["image_size"] // vision_config["patch_size"]
    patch = vision_config["patch_size"]
    emb = "vision_model.embeddings."
    shapes: dict[str, tuple[int, ...]] = {
        f"{emb}class_embedding": (1, 1, hidden),
        f"{emb}patch_embedding.weight": (hidden, 3, patch, patch),
        f"{emb}patch_embedding.bias": (hidden,),
        f"{emb}position_embedding": (1, side * side + 1, hidden),
    }
    layer_norm = vision_config["norm_type"] == "layer_norm"
    for i in range(vision_config["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        shapes[f"{pre}attn.qkv.weight"] = (3 * hidden, hidden)
        if vision_config["qkv_bias"]:
            shapes[f"{pre}attn.qkv.bias"] = (3 * hidden,)
        if vision_config["qk_normalization"]:
            shapes[f"{pre}attn.q_norm.weight"] = (hidden,)
            shapes[f"{pre}attn.k_norm.weight"] = (hidden,)
        shapes[f"{pre}attn.proj.weight"] = (hidden, hidden)
        shapes[f"{pre}attn.proj.bias"] = (hidden,)
        shapes[f"{pre}mlp.fc1.weight"] = (inner, hidden)
        shapes[f"{pre}mlp.fc1.bias"] = (inner,)
        shapes[f"{pre}mlp.fc2.weight"] = (hidden, inner)
        shapes[f"{pre}mlp.fc2.bias"] = (hidden,)
        for norm in ("norm1", "norm2"):
            shapes[f"{pre}{norm}.weight"] = (hidden,)
            if layer_norm:
                shapes[f"{pre}{norm}.bias"] = (hidden,)
        shapes[f"{pre}ls1"] = (hidden,)
        shapes[f"{pre}ls2"] = (hidden,)
    return shapes


def llm_shapes(
    llm_config: dict[str, Any], vit_hidden: int = VIT_HIDDEN
) -> dict[str, tuple[int, ...]]:
    """Original key names and shapes of `mlp1` and `language_model.` for the config's family."""
    family = llm_config["model_type"]
    dim = llm_config["hidden_size"]
    heads = llm_config["num_attention_heads"]
    kv_heads = llm_config["num_key_value_heads"]
    head_dim = dim // heads
    inner = llm_config["intermediate_size"]
    vocab = llm_config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "mlp1.0.weight": (4 * vit_hidden,),
        "mlp1.0.bias": (4 * vit_hidden,),
        "mlp1.1.weight": (dim, 4 * vit_hidden),
        "mlp1.1.bias": (dim,),
        "mlp1.3.weight": (dim, dim),
        "mlp1.3.bias": (dim,),
    }
    lm = "language_model."
    if family == "internlm2":
        shapes[f"{lm}model.tok_embeddings.weight"] = (vocab, dim)
        shapes[f"{lm}output.weight"] = (vocab, dim)
    else:
        shapes[f"{lm}model.embed_tokens.weight"] = (vocab, dim)
        shapes[f"{lm}lm_head.weight"] = (vocab, dim)
    shapes[f"{lm}model.norm.weight"] = (dim,)
    for i in range(llm_config["num_hidden_layers"]):
        pre = f"{lm}model.layers.{i}."
        if family == "internlm2":
            shapes[f"{pre}attention.wqkv.weight"] = ((heads + 2 * kv_heads) * head_dim, dim)
            shapes[f"{pre}attention.wo.weight"] = (dim, heads * head_dim)
            shapes[f"{pre}feed_forward.w1.weight"] = (inner, dim)
            shapes[f"{pre}feed_forward.w3.weight"] = (inner, dim)
            shapes[f"{pre}feed_forward.w2.weight"] = (dim, inner)
            shapes[f"{pre}attention_norm.weight"] = (dim,)
            shapes[f"{pre}ffn_norm.weight"] = (dim,)
            continue
        if family == "phi3":
            shapes[f"{pre}self_attn.qkv_proj.weight"] = ((heads + 2 * kv_heads) * head_dim, dim)
            shapes[f"{pre}mlp.gate_up_proj.weight"] = (2 * inner, dim)
        else:
            for name, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                shapes[f"{pre}self_attn.{name}_proj.weight"] = (rows * head_dim, dim)
                if family == "qwen2":
                    shapes[f"{pre}self_attn.{name}_proj.bias"] = (rows * head_dim,)
            shapes[f"{pre}mlp.gate_proj.weight"] = (inner, dim)
            shapes[f"{pre}mlp.up_proj.weight"] = (inner, dim)
        shapes[f"{pre}self_attn.o_proj.weight"] = (dim, heads * head_dim)
        shapes[f"{pre}mlp.down_proj.weight"] = (dim, inner)
        shapes[f"{pre}input_layernorm.weight"] = (dim,)
        shapes[f"{pre}post_attention_layernorm.weight"] = (dim,)
    return shapes


_NORM_SUFFIXES = ("norm.weight", "norm1.weight", "norm2.weight", "mlp1.0.weight")


def _random_tensors(
    shapes: dict[str, tuple[int, ...]], *, seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Seeded values per key, independent of key order.

    Linears ~N(0, 0.02), norm weights ~1, layer scales in [0.1, 1] so the image path matters.
    """
    tensors: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        if key.endswith(("ls1", "ls2")):
            value = 0.1 + 0.9 * torch.rand(shape, generator=gen)  # [C]
        elif key.endswith(_NORM_SUFFIXES):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)  # [C]
        else:
            value = LINEAR_STD * torch.randn(shape, generator=gen)  # [*shape]
        tensors[key] = value.to(dtype).contiguous()
    return tensors


def _write_weights(
    out: Path,
    tensors: dict[str, torch.Tensor],
    *,
    num_shards: int,
    weights_format: WeightsFormat,
) -> None:
    """One file or `num_shards` shards plus an HF-style index (`metadata.total_size`)."""
    for pattern in _WEIGHT_PATTERNS:
        for stale in out.glob(pattern):
            stale.unlink()
    keys = list(tensors)
    num_shards = min(num_shards, len(keys))
    stem, suffix = (
        ("model", "safetensors") if weights_format == "safetensors" else ("pytorch_model", "bin")
    )
    if num_shards == 1:
        _save(out / f"{stem}.{suffix}", tensors, weights_format)
        return
    # Consecutive, non-empty groups of about equal key count.
    bounds = [round(i * len(keys) / num_shards) for i in range(num_shards + 1)]
    groups = [keys[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    weight_map: dict[str, str] = {}
    for index, group in enumerate(groups, start=1):
        name = f"{stem}-{index:05d}-of-{num_shards:05d}.{suffix}"
        _save(out / name, {k: tensors[k] for k in group}, weights_format)
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / f"{stem}.{suffix}.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")


def _save(path: Path, tensors: dict[str, torch.Tensor], weights_format: WeightsFormat) -> None:
    if weights_format == "safetensors":
        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, path)


def main(argv: list[str] | None = None) -> Path:
    """CLI: `python -m internvl_core.testing.tiny --family qwen2 --out models/tiny`."""
    parser = argparse.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--out", required=True, type=Path, help="checkpoint folder to (re)write")
    add("--family", default="qwen2", choices=get_args(Family))
    add("--vit", default="300m", choices=get_args(VitKind))
    add("--ps-version", default="v2", choices=("v1", "v2"))
    add("--no-dynamic", dest="dynamic_image_size", action="store_false")
    add("--no-thumbnail", dest="use_thumbnail", action="store_false")
    add("--max-dynamic-patch", type=int, default=12)
    add("--image-size", type=int, default=56)
    add("--layers", dest="num_llm_layers", type=int, default=2, help="LLM layers")
    add("--vit-layers", dest="num_vit_layers", type=int, default=2)
    add("--dtype", default="float32", choices=get_args(DtypeName))
    add("--seed", type=int, default=0)
    add("--shards", dest="num_shards", type=int, default=1)
    add("--format", dest="weights_format", default="safetensors", choices=get_args(WeightsFormat))
    add("--template", default=None)
    add("--system-message", default=None)
    kwargs = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return make_tiny_checkpoint(kwargs.pop("out"), **kwargs)


if __name__ == "__main__":
    main()
