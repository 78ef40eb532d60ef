"""Tiny checkpoint generator: original-format config, key sets of spec section 4, determinism."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from internvl_core.checkpoint import CheckpointReader
from internvl_core.config import ModelArchitecture
from internvl_core.errors import CheckpointError
from internvl_core.testing.tiny import main, make_tiny_checkpoint

FAMILIES = ("qwen2", "internlm2", "phi3", "llama")
TinyFactory = Callable[..., Path]

VIT_LAYER_300M = {
    "attn.qkv.weight": (96, 32),
    "attn.qkv.bias": (96,),
    "attn.proj.weight": (32, 32),
    "attn.proj.bias": (32,),
    "mlp.fc1.weight": (64, 32),
    "mlp.fc1.bias": (64,),
    "mlp.fc2.weight": (32, 64),
    "mlp.fc2.bias": (32,),
    "norm1.weight": (32,),
    "norm1.bias": (32,),
    "norm2.weight": (32,),
    "norm2.bias": (32,),
    "ls1": (32,),
    "ls2": (32,),
}
VIT_LAYER_6B = {
    **{
        k: v
        for k, v in VIT_LAYER_300M.items()
        if k not in ("attn.qkv.bias", "norm1.bias", "norm2.bias")
    },
    "attn.q_norm.weight": (32,),
    "attn.k_norm.weight": (32,),
}
# Per-layer LLM keys under language_model.model.layers.{i}. (D=64, H=4, K=2, d=16, I=128).
LLM_LAYER = {
    "internlm2": {
        "attention.wqkv.weight": ((4 + 2 * 2) * 16, 64),
        "attention.wo.weight": (64, 64),
        "feed_forward.w1.weight": (128, 64),
        "feed_forward.w3.weight": (128, 64),
        "feed_forward.w2.weight": (64, 128),
        "attention_norm.weight": (64,),
        "ffn_norm.weight": (64,),
    },
    "qwen2": {
        "self_attn.q_proj.weight": (64, 64),
        "self_attn.q_proj.bias": (64,),
        "self_attn.k_proj.weight": (32, 64),
        "self_attn.k_proj.bias": (32,),
        "self_attn.v_proj.weight": (32, 64),
        "self_attn.v_proj.bias": (32,),
        "self_attn.o_proj.weight": (64, 64),
        "mlp.gate_proj.weight": (128, 64),
        "mlp.up_proj.weight": (128, 64),
        "mlp.down_proj.weight": (64, 128),
        "input_layernorm.weight": (64,),
        "post_attention_layernorm.weight": (64,),
    },
    "phi3": {
        "self_attn.qkv_proj.weight": ((4 + 2 * 4) * 16, 64),
        "self_attn.o_proj.weight": (64, 64),
        "mlp.gate_up_proj.weight": (256, 64),
        "mlp.down_proj.weight": (64, 128),
        "input_layernorm.weight": (64,),
        "post_attention_layernorm.weight": (64,),
    },
}
LLM_LAYER["llama"] = {k: v for k, v in LLM_LAYER["qwen2"].items() if not k.endswith(".bias")}


def _expected_shapes(family: str, vit: str, vocab: int) -> dict[str, tuple[int, ...]]:
    emb = "vision_model.embeddings."
    shapes: dict[str, tuple[int, ...]] = {
        f"{emb}class_embedding": (1, 1, 32),
        f"{emb}patch_embedding.weight": (32, 3, 14, 14),
        f"{emb}patch_embedding.bias": (32,),
        f"{emb}position_embedding": (1, 17, 32),
        "mlp1.0.weight": (128,),
        "mlp1.0.bias": (128,),
        "mlp1.1.weight": (64, 128),
        "mlp1.1.bias": (64,),
        "mlp1.3.weight": (64, 64),
        "mlp1.3.bias": (64,),
        "language_model.model.norm.weight": (64,),
    }
    layer = VIT_LAYER_6B if vit == "6b" else VIT_LAYER_300M
    for i in range(2):
        shapes.update({f"vision_model.encoder.layers.{i}.{k}": v for k, v in layer.items()})
        shapes.update(
            {f"language_model.model.layers.{i}.{k}": v for k, v in LLM_LAYER[family].items()}
        )
    if family == "internlm2":
        shapes["language_model.model.tok_embeddings.weight"] = (vocab, 64)
        shapes["language_model.output.weight"] = (vocab, 64)
    else:
        shapes["language_model.model.embed_tokens.weight"] = (vocab, 64)
        shapes["language_model.lm_head.weight"] = (vocab, 64)
    return shapes


@pytest.mark.parametrize("vit", ["300m", "6b"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keys_and_shapes_match_spec(tiny_checkpoint: TinyFactory, family: str, vit: str) -> None:
    path = tiny_checkpoint(family, vit=vit)
    arch = ModelArchitecture.from_checkpoint(path)
    reader = CheckpointReader(path)
    tensors = reader.load(reader.keys())
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert shapes == _expected_shapes(family, vit, arch.llm.vocab_size)
    assert all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_config_parses_into_model_architecture(tiny_checkpoint: TinyFactory, family: str) -> None:
    path = tiny_checkpoint(family)
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == ["InternVLChatModel"]
    assert raw["model_type"] == "internvl_chat"
    assert raw["vision_config"]["model_type"] == "intern_vit_6b"
    arch = ModelArchitecture.from_dict(raw)
    assert arch.llm.family == family
    assert arch.num_image_token == 4
    assert arch.ps_version == "v2" and arch.dynamic_image_size and arch.use_thumbnail
    assert arch.vision.norm_type == "layer_norm" and arch.vision.qkv_bias
    assert not arch.vision.qk_normalization
    assert arch.llm.head_dim == 16 and not arch.llm.tie_word_embeddings
    assert arch.llm.num_key_value_heads == (4 if family == "phi3" else 2)
    assert arch.llm.attention_bias == (family == "qwen2")
    expected_template = {"qwen2": "Hermes-2", "phi3": "phi3-chat"}.get(family, "internlm2-chat")
    assert arch.template == expected_template


def test_rope_fields_per_family(tiny_checkpoint: TinyFactory) -> None:
    internlm2 = ModelArchitecture.from_checkpoint(tiny_checkpoint("internlm2")).llm
    assert internlm2.rope_scaling is not None and internlm2.rope_scaling.type == "dynamic"
    assert internlm2.rope_scaling.factor == 2.0 and internlm2.rope_theta == 1e6
    phi3 = ModelArchitecture.from_checkpoint(tiny_checkpoint("phi3")).llm
    scaling = phi3.rope_scaling
    assert scaling is not None and scaling.type == "longrope"
    assert scaling.original_max_position_embeddings == 4096
    assert scaling.short_factor is not None and scaling.long_factor is not None
    assert len(scaling.short_factor) == len(scaling.long_factor) == 8
    assert max(scaling.long_factor) > max(scaling.short_factor)
    assert phi3.max_position_embeddings == 131072 and phi3.rope_theta == 1e4
    llama = ModelArchitecture.from_checkpoint(tiny_checkpoint("llama")).llm
    assert llama.rope_scaling is None and llama.rope_theta == 5e5


def test_6b_vision_and_v1_options(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(
        tmp_path,
        family="llama",
        vit="6b",
        ps_version="v1",
        dynamic_image_size=False,
        use_thumbnail=False,
        image_size=112,
        template="Hermes-2",
        system_message="Answer the questions.",
    )
    arch = ModelArchitecture.from_checkpoint(path)
    assert arch.vision.norm_type == "rms_norm" and arch.vision.qk_normalization
    assert not arch.vision.qkv_bias
    assert arch.ps_version == "v1" and not arch.dynamic_image_size and not arch.use_thumbnail
    assert arch.num_image_token == 16 and arch.template == "Hermes-2"
    assert arch.system_message == "Answer the questions."
    position = CheckpointReader(path).load(["vision_model.embeddings.position_embedding"])
    assert position["vision_model.embeddings.position_embedding"].shape == (1, 65, 32)


@pytest.mark.parametrize(("fmt", "num_shards"), [("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_sharded_and_bin_formats_hold_same_tensors(
    tiny_checkpoint: TinyFactory, tmp_path: Path, fmt: str, num_shards: int
) -> None:
    reference = CheckpointReader(tiny_checkpoint("qwen2"))
    path = make_tiny_checkpoint(tmp_path, family="qwen2", weights_format=fmt, num_shards=num_shards)
    reader = CheckpointReader(path)
    assert reader.keys() == reference.keys()
    for key, value in reference.load(reference.keys()).items():
        torch.testing.assert_close(reader.load([key])[key], value, rtol=0, atol=0)
    stem = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    if num_shards > 1:
        index = json.loads((path / f"{stem}.index.json").read_text())
        assert len(set(index["weight_map"].values())) == num_shards
        total = sum(t.numel() * t.element_size() for t in reader.load(reader.keys()).values())
        assert index["metadata"]["total_size"] == total
    else:
        assert (path / stem).is_file()


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_and_idempotent(tmp_path: Path, family: str) -> None:
    start = time.perf_counter()
    first = _digest(make_tiny_checkpoint(tmp_path / "a", family=family))
    assert time.perf_counter() - start < 5.0
    assert _digest(make_tiny_checkpoint(tmp_path / "b", family=family)) == first
    # Rewriting a folder that held a sharded checkpoint leaves no stale shards behind.
    make_tiny_checkpoint(tmp_path / "a", family=family, num_shards=2)
    assert _digest(make_tiny_checkpoint(tmp_path / "a", family=family)) == first
    other_seed = _digest(make_tiny_checkpoint(tmp_path / "c", family=family, seed=1))
    assert other_seed != first


def test_bin_output_is_deterministic(tmp_path: Path) -> None:
    first = _digest(make_tiny_checkpoint(tmp_path / "a", weights_format="bin"))
    assert _digest(make_tiny_checkpoint(tmp_path / "b", weights_format="bin")) == first


def test_value_ranges_make_every_path_matter(tiny_checkpoint: TinyFactory) -> None:
    tensors = CheckpointReader(tiny_checkpoint("internlm2", vit="6b")).load(lambda k: True)
    ls = tensors["vision_model.encoder.layers.0.ls1"]
    assert ls.min().item() >= 0.1 and ls.max().item() <= 1.0
    norm = tensors["language_model.model.layers.0.attention_norm.weight"]
    assert (norm - 1.0).abs().max().item() < 0.6
    wqkv = tensors["language_model.model.layers.0.attention.wqkv.weight"]
    assert 0.01 < wqkv.std().item() < 0.03


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtype(tmp_path: Path, dtype: str) -> None:
    path = make_tiny_checkpoint(tmp_path, family="phi3", dtype=dtype)
    arch = ModelArchitecture.from_checkpoint(path)
    assert arch.torch_dtype == dtype
    tensors = CheckpointReader(path).load(lambda k: True)
    assert {t.dtype for t in tensors.values()} == {getattr(torch, dtype)}


def test_invalid_arguments_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="image_size is 50"):
        make_tiny_checkpoint(tmp_path, image_size=50)
    with pytest.raises(CheckpointError, match="num_shards is 0"):
        make_tiny_checkpoint(tmp_path, num_shards=0)
    with pytest.raises(CheckpointError, match="family is 'mistral'"):
        make_tiny_checkpoint(tmp_path, family="mistral")  # type: ignore[arg-type]


def test_cli_writes_and_is_idempotent(tmp_path: Path) -> None:
    argv = ["--family", "internlm2", "--out", str(tmp_path), "--vit", "6b", "--layers", "3"]
    argv += ["--shards", "2", "--ps-version", "v1", "--no-dynamic"]
    main(argv)
    first = _digest(tmp_path)
    main(argv)
    assert _digest(tmp_path) == first
    arch = ModelArchitecture.from_checkpoint(tmp_path)
    assert arch.llm.num_hidden_layers == 3 and arch.vision.norm_type == "rms_norm"
    assert arch.ps_version == "v1" and not arch.dynamic_image_size
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert (tmp_path / "tokenizer.model").is_file()


def test_session_fixtures_cache_by_arguments(
    tiny_checkpoint: TinyFactory, tiny_qwen2: Path
) -> None:
    assert tiny_checkpoint("qwen2") == tiny_qwen2
    assert tiny_checkpoint("qwen2", vit="6b") == tiny_checkpoint("qwen2", vit="6b")
    assert tiny_checkpoint("qwen2", vit="6b") != tiny_qwen2


def test_family_fixtures(
    tiny_internlm2: Path, tiny_phi3: Path, tiny_llama: Path, tiny_internlm2_6b: Path
) -> None:
    families = [ModelArchitecture.from_checkpoint(p).llm.family for p in (tiny_phi3, tiny_llama)]
    assert families == ["phi3", "llama"]
    assert ModelArchitecture.from_checkpoint(tiny_internlm2).vision.norm_type == "layer_norm"
    assert ModelArchitecture.from_checkpoint(tiny_internlm2_6b).vision.norm_type == "rms_norm"


@pytest.mark.gpu
def test_gpu_marker_is_skipped_without_cuda() -> None:
    assert torch.cuda.is_available()
