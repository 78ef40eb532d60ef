"""Checkpoint name maps per decoder family: original InternVL keys -> our fused parameters.

Recipes say which original tensors (relative to the `language_model.` prefix) build each of our
parameters and how (copy, row concat, InternLM2 `wqkv` regrouping). Loading asks the reader only for
the keys of the layers a stage owns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from internvl_core.checkpoint.reader import IGNORED_SUFFIXES, CheckpointReader
from internvl_core.config import LLMArchitecture
from internvl_core.errors import CheckpointError

Combine = Literal["copy", "cat", "internlm2_qkv"]
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True, slots=True)
class TensorRecipe:
    """How one of our parameters is built from original tensors (names without the prefix)."""

    sources: tuple[str, ...]
    combine: Combine = "copy"


def o_proj_has_bias(arch: LLMArchitecture) -> bool:
    """Qwen2's bias covers q/k/v only; Llama `attention_bias` and InternLM2 `bias` also cover o."""
    return arch.attention_bias and arch.family in ("llama", "internlm2")


def _internlm2_layer(arch: LLMArchitecture, src: str) -> dict[str, TensorRecipe]:
    recipes = {
        "input_layernorm.weight": TensorRecipe((src + "attention_norm.weight",)),
        "post_attention_layernorm.weight": TensorRecipe((src + "ffn_norm.weight",)),
        "self_attn.qkv_proj.weight": TensorRecipe(
            (src + "attention.wqkv.weight",), "internlm2_qkv"
        ),
        "self_attn.o_proj.weight": TensorRecipe((src + "attention.wo.weight",)),
        "mlp.gate_up_proj.weight": TensorRecipe(
            (src + "feed_forward.w1.weight", src + "feed_forward.w3.weight"), "cat"
        ),
        "mlp.down_proj.weight": TensorRecipe((src + "feed_forward.w2.weight",)),
    }
    if arch.attention_bias:
        recipes["self_attn.qkv_proj.bias"] = TensorRecipe(
            (src + "attention.wqkv.bias",), "internlm2_qkv"
        )
        recipes["self_attn.o_proj.bias"] = TensorRecipe((src + "attention.wo.bias",))
    return recipes


def _hf_layer(arch: LLMArchitecture, src: str) -> dict[str, TensorRecipe]:
    attn, mlp = src + "self_attn.", src + "mlp."
    recipes = {
        "input_layernorm.weight": TensorRecipe((src + "input_layernorm.weight",)),
        "post_attention_layernorm.weight": TensorRecipe((src + "post_attention_layernorm.weight",)),
        "self_attn.o_proj.weight": TensorRecipe((attn + "o_proj.weight",)),
        "mlp.down_proj.weight": TensorRecipe((mlp + "down_proj.weight",)),
    }
    if arch.family == "phi3":
        recipes["self_attn.qkv_proj.weight"] = TensorRecipe((attn + "qkv_proj.weight",))
        recipes["mlp.gate_up_proj.weight"] = TensorRecipe((mlp + "gate_up_proj.weight",))
        return recipes
    qkv = tuple(f"{attn}{name}_proj.weight" for name in ("q", "k", "v"))
    recipes["self_attn.qkv_proj.weight"] = TensorRecipe(qkv, "cat")
    if arch.attention_bias:
        qkv_bias = tuple(f"{attn}{name}_proj.bias" for name in ("q", "k", "v"))
        recipes["self_attn.qkv_proj.bias"] = TensorRecipe(qkv_bias, "cat")
    if o_proj_has_bias(arch):
        recipes["self_attn.o_proj.bias"] = TensorRecipe((attn + "o_proj.bias",))
    gate_up = (mlp + "gate_proj.weight", mlp + "up_proj.weight")
    recipes["mlp.gate_up_proj.weight"] = TensorRecipe(gate_up, "cat")
    return recipes


def layer_recipes(arch: LLMArchitecture, layer_idx: int) -> dict[str, TensorRecipe]:
    """Recipes of one decoder layer, keyed by parameter name inside our DecoderLayer."""
    src = f"model.layers.{layer_idx}."
    if arch.family == "internlm2":
        return _internlm2_layer(arch, src)
    return _hf_layer(arch, src)


def embedding_key(arch: LLMArchitecture) -> str:
    """Original name of the token embedding matrix [V, D]."""
    return (
        "model.tok_embeddings.weight" if arch.family == "internlm2" else "model.embed_tokens.weight"
    )


def head_key(arch: LLMArchitecture) -> str:
    """Original name of the untied LM head [V, D]."""
    return "output.weight" if arch.family == "internlm2" else "lm_head.weight"


NORM_KEY = "model.norm.weight"


def split_internlm2_wqkv(
    packed: torch.Tensor, arch: LLMArchitecture
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split `wqkv` rows grouped by kv head into q [H*d, ...], k [K*d, ...], v [K*d, ...].

    Block g of `W.view(K, G+2, d, ...)` holds q heads g*G..g*G+G-1, then k head g, then v head g.
    Works for the weight [(H+2K)*d, D] and the bias [(H+2K)*d].
    """
    heads, kv_heads, head_dim = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    group = heads // kv_heads
    rest = packed.shape[1:]
    expected = (heads + 2 * kv_heads) * head_dim
    if packed.shape[0] != expected:
        raise CheckpointError(f"attention.wqkv has {packed.shape[0]} rows; expected {expected}")
    grouped = packed.reshape(kv_heads, group + 2, head_dim, *rest)  # [K, G+2, d, ...]
    q = grouped[:, :group].reshape(heads * head_dim, *rest)  # [H*d, ...]
    k = grouped[:, group].reshape(kv_heads * head_dim, *rest)  # [K*d, ...]
    v = grouped[:, group + 1].reshape(kv_heads * head_dim, *rest)  # [K*d, ...]
    return q, k, v


def assemble(
    recipes: dict[str, TensorRecipe], loaded: dict[str, torch.Tensor], arch: LLMArchitecture
) -> dict[str, torch.Tensor]:
    """Build our tensors from the loaded original ones (keys without the prefix)."""
    out: dict[str, torch.Tensor] = {}
    for name, recipe in recipes.items():
        parts = [loaded[key] for key in recipe.sources]
        if recipe.combine == "cat":
            out[name] = torch.cat(parts, dim=0)  # [sum of rows, ...]
        elif recipe.combine == "internlm2_qkv":
            out[name] = torch.cat(split_internlm2_wqkv(parts[0], arch), dim=0)  # [(H+2K)d, ...]
        else:
            out[name] = parts[0]
    return out


def load_recipes(
    reader: CheckpointReader,
    recipes: dict[str, TensorRecipe],
    arch: LLMArchitecture,
    *,
    prefix: str,
    dtype: torch.dtype,
    device: torch.device | str,
) -> dict[str, torch.Tensor]:
    """Read exactly the recipes' source keys (one `reader.load` call) and assemble them."""
    keys = sorted({prefix + key for recipe in recipes.values() for key in recipe.sources})
    loaded = reader.load(keys, dtype=dtype, device=device)
    stripped = {key[len(prefix) :]: value for key, value in loaded.items()}
    return assemble(recipes, stripped, arch)


@dataclass(frozen=True, slots=True)
class StageKeys:
    """What a stage [start_layer, end_layer) owns, besides its layers."""

    start_layer: int
    end_layer: int
    embedding: bool  # first stage: token embeddings
    norm_and_head: bool  # last stage: final norm + LM head


def check_stage_keys(
    reader_keys: list[str], arch: LLMArchitecture, stage: StageKeys, *, prefix: str
) -> None:
    """Fail listing every missing key the stage needs and every unexpected key in its scope.

    Scope: keys of the stage's layers, plus every key under `prefix` that belongs to no layer and is
    not the embedding / norm / head, plus layer indices past `num_hidden_layers`. Keys ending in
    `rotary_emb.inv_freq` are ignored; a head key is tolerated when embeddings are tied.
    """
    available = {k[len(prefix) :] for k in reader_keys if k.startswith(prefix)}
    available = {k for k in available if not k.endswith(IGNORED_SUFFIXES)}
    needed: set[str] = set()
    for idx in range(stage.start_layer, stage.end_layer):
        needed.update(s for r in layer_recipes(arch, idx).values() for s in r.sources)
    if stage.embedding or (stage.norm_and_head and arch.tie_word_embeddings):
        needed.add(embedding_key(arch))
    if stage.norm_and_head:
        needed.add(NORM_KEY)
        if not arch.tie_word_embeddings:
            needed.add(head_key(arch))
    tolerated = {embedding_key(arch), NORM_KEY, head_key(arch)}
    unexpected: list[str] = []
    for key in sorted(available - needed):
        match = _LAYER_KEY.match(key)
        if match is None:
            if key not in tolerated:
                unexpected.append(key)
            continue
        idx = int(match.group(1))
        if idx >= arch.num_hidden_layers or stage.start_layer <= idx < stage.end_layer:
            unexpected.append(key)
    missing = sorted(needed - available)
    if missing or unexpected:
        raise CheckpointError(
            f"{arch.family} decoder layers [{stage.start_layer}, {stage.end_layer}) under "
            f"{prefix!r}: {len(missing)} missing keys {missing[:20]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:20]}"
        )
