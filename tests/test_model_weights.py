"""Checkpoint name maps: per-family recipes, InternLM2 wqkv regrouping, stage key checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from internvl_core.checkpoint.reader import CheckpointReader
from internvl_core.config import LLMArchitecture
from internvl_core.errors import CheckpointError
from internvl_core.model.weights import (
    StageKeys,
    check_stage_keys,
    embedding_key,
    head_key,
    layer_recipes,
    load_recipes,
    split_internlm2_wqkv,
)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 8, 4, 2, 2, 6
GROUP = HEADS // KV_HEADS
PREFIX = "language_model."


def _arch(family: str, *, bias: bool = False, tie: bool = False, layers: int = 3):
    return LLMArchitecture(
        family=family,
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        intermediate_size=INTER,
        vocab_size=16,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=64,
        attention_bias=bias,
        tie_word_embeddings=tie,
    )


def _original_keys(family: str, num_layers: int, *, bias: bool = False) -> list[str]:
    """Original names per the spec table (section 4), written out independently."""
    if family == "internlm2":
        keys = ["model.tok_embeddings.weight", "model.norm.weight", "output.weight"]
        per_layer = [
            "attention.wqkv.weight",
            "attention.wo.weight",
            "feed_forward.w1.weight",
            "feed_forward.w3.weight",
            "feed_forward.w2.weight",
            "attention_norm.weight",
            "ffn_norm.weight",
        ]
    else:
        keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        per_layer = ["self_attn.o_proj.weight", "mlp.down_proj.weight"]
        per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
        if family == "phi3":
            per_layer += ["self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"]
        else:
            per_layer += [f"self_attn.{n}_proj.weight" for n in "qkv"]
            per_layer += ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
            if bias:
                per_layer += [f"self_attn.{n}_proj.bias" for n in "qkv"]
    for i in range(num_layers):
        keys += [f"model.layers.{i}.{name}" for name in per_layer]
    return keys


@pytest.mark.parametrize(
    ("family", "bias"), [("qwen2", True), ("llama", False), ("phi3", False), ("internlm2", False)]
)
def test_recipes_cover_exactly_the_original_layer_keys(family: str, bias: bool) -> None:
    arch = _arch(family, bias=bias)
    sources = {s for r in layer_recipes(arch, 1).values() for s in r.sources}
    expected = {k for k in _original_keys(family, 2, bias=bias) if k.startswith("model.layers.1.")}
    assert sources == expected
    assert embedding_key(arch) in _original_keys(family, 0)
    assert head_key(arch) in _original_keys(family, 0)


def test_llama_attention_bias_also_covers_o_proj() -> None:
    names = set(layer_recipes(_arch("llama", bias=True), 0))
    assert {"self_attn.qkv_proj.bias", "self_attn.o_proj.bias"} <= names
    assert "self_attn.o_proj.bias" not in layer_recipes(_arch("qwen2", bias=True), 0)


def test_internlm2_wqkv_split_by_kv_group() -> None:
    arch = _arch("internlm2")
    rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    packed = torch.arange(rows * HIDDEN, dtype=torch.float32).view(rows, HIDDEN)  # [(H+2K)d, D]
    q, k, v = split_internlm2_wqkv(packed, arch)
    block = (GROUP + 2) * HEAD_DIM  # rows per kv group
    for head in range(HEADS):
        group, slot = divmod(head, GROUP)
        start = group * block + slot * HEAD_DIM
        torch.testing.assert_close(
            q[head * HEAD_DIM : (head + 1) * HEAD_DIM], packed[start : start + HEAD_DIM]
        )
    for group in range(KV_HEADS):
        k_start = group * block + GROUP * HEAD_DIM
        v_start = k_start + HEAD_DIM
        rows_k = slice(group * HEAD_DIM, (group + 1) * HEAD_DIM)
        torch.testing.assert_close(k[rows_k], packed[k_start : k_start + HEAD_DIM])
        torch.testing.assert_close(v[rows_k], packed[v_start : v_start + HEAD_DIM])
    bias_q, _, bias_v = split_internlm2_wqkv(packed[:, 0], arch)  # 1-D bias packs the same way
    torch.testing.assert_close(bias_q, q[:, 0])
    torch.testing.assert_close(bias_v, v[:, 0])
    with pytest.raises(CheckpointError, match="wqkv has 5 rows"):
        split_internlm2_wqkv(packed[:5], arch)


def _save(path: Path, keys: list[str]) -> CheckpointReader:
    gen = torch.Generator().manual_seed(0)
    save_file(
        {PREFIX + k: torch.randn(4, generator=gen) for k in keys}, str(path / "model.safetensors")
    )
    return CheckpointReader(path)


def test_load_recipes_concatenates_in_order(tmp_path: Path) -> None:
    arch = _arch("qwen2", bias=True)
    reader = _save(tmp_path, _original_keys("qwen2", 1, bias=True))
    built = load_recipes(
        reader, layer_recipes(arch, 0), arch, prefix=PREFIX, dtype=torch.float64, device="cpu"
    )
    raw = reader.load_prefix(PREFIX + "model.layers.0.")
    expected = torch.cat([raw[f"self_attn.{n}_proj.bias"] for n in "qkv"])
    torch.testing.assert_close(built["self_attn.qkv_proj.bias"], expected.double())
    gate_up = torch.cat([raw["mlp.gate_proj.weight"], raw["mlp.up_proj.weight"]]).double()
    torch.testing.assert_close(built["mlp.gate_up_proj.weight"], gate_up)
    assert built["mlp.down_proj.weight"].dtype == torch.float64


def test_stage_checks_pass_and_ignore_rotary_buffers(tmp_path: Path) -> None:
    arch = _arch("internlm2")
    keys = [*_original_keys("internlm2", 3), "model.layers.1.attention.rotary_emb.inv_freq"]
    reader = _save(tmp_path, keys)
    for stage in (StageKeys(0, 3, True, True), StageKeys(1, 2, False, False)):
        check_stage_keys(reader.keys(), arch, stage, prefix=PREFIX)


def test_missing_keys_are_listed(tmp_path: Path) -> None:
    arch = _arch("llama")
    keys = [k for k in _original_keys("llama", 3) if k != "model.layers.2.mlp.up_proj.weight"]
    keys.remove("model.norm.weight")
    reader = _save(tmp_path, keys)
    check_stage_keys(reader.keys(), arch, StageKeys(0, 2, True, False), prefix=PREFIX)
    with pytest.raises(CheckpointError) as info:
        check_stage_keys(reader.keys(), arch, StageKeys(2, 3, False, True), prefix=PREFIX)
    assert "2 missing keys" in str(info.value)
    assert "model.layers.2.mlp.up_proj.weight" in str(info.value)
    assert "model.norm.weight" in str(info.value)


def test_unexpected_keys_are_listed(tmp_path: Path) -> None:
    arch = _arch("phi3")
    extra = [
        "model.layers.1.self_attn.q_proj.weight",  # Phi-3 has a fused qkv_proj only
        "model.layers.7.mlp.down_proj.weight",  # past num_hidden_layers
        "model.final_layernorm.weight",  # belongs to no layer and is no known tensor
    ]
    reader = _save(tmp_path, _original_keys("phi3", 3) + extra)
    with pytest.raises(CheckpointError) as info:
        check_stage_keys(reader.keys(), arch, StageKeys(1, 2, False, False), prefix=PREFIX)
    message = str(info.value)
    assert "3 unexpected keys" in message and "0 missing keys" in message
    for key in extra:
        assert key in message
    # another stage does not own layer 1, so only the two global oddities are its concern
    with pytest.raises(CheckpointError, match="2 unexpected keys"):
        check_stage_keys(reader.keys(), arch, StageKeys(2, 3, False, True), prefix=PREFIX)


def test_tied_head_reads_the_embedding(tmp_path: Path) -> None:
    arch = _arch("llama", tie=True)
    keys = [k for k in _original_keys("llama", 3) if k != "lm_head.weight"]
    reader = _save(tmp_path, keys)
    check_stage_keys(reader.keys(), arch, StageKeys(2, 3, False, True), prefix=PREFIX)
    untied = _arch("llama")
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        check_stage_keys(reader.keys(), untied, StageKeys(2, 3, False, True), prefix=PREFIX)
