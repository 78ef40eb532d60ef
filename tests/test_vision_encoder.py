"""VisionEncoder: checkpoint loading, equivalence with transformers, select_layer, batching."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from internvl_core.config import ModelArchitecture
from internvl_core.errors import CheckpointError, InvalidRequestError
from internvl_core.preprocess.image import normalize_pixels
from internvl_core.vision.encoder import VisionEncoder, normalize_tiles
from tests.hf_reference import hf_vision_keys

VIT, INNER, LLM = 32, 64, 64


def _config(layout: str, *, num_layers: int, ps_version: str, select_layer: int) -> dict[str, Any]:
    """config.json in the original InternVLChatConfig layout (56 px tiles, 4 tokens per tile)."""
    is_6b = layout == "6b"
    vision = {
        "architectures": ["InternVisionModel"],
        "hidden_size": VIT,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
        "intermediate_size": INNER,
        "image_size": 56,
        "patch_size": 14,
        "norm_type": "rms_norm" if is_6b else "layer_norm",
        "layer_norm_eps": 1e-6,
        "qkv_bias": not is_6b,
        "qk_normalization": is_6b,
        "hidden_act": "gelu",
        "drop_path_rate": 0.0,
        "use_flash_attn": False,
    }
    llm = {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": LLM,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 512,
    }
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "vision_config": vision,
        "llm_config": llm,
        "template": "Hermes-2",
        "ps_version": ps_version,
        "downsample_ratio": 0.5,
        "force_image_size": 56,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
        "select_layer": select_layer,
        "torch_dtype": "float32",
    }


def _original_shapes(layout: str, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Key names and shapes written out from spec section 4 (not derived from our modules)."""
    emb = "vision_model.embeddings."
    shapes: dict[str, tuple[int, ...]] = {
        emb + "class_embedding": (1, 1, VIT),
        emb + "patch_embedding.weight": (VIT, 3, 14, 14),
        emb + "patch_embedding.bias": (VIT,),
        emb + "position_embedding": (1, 17, VIT),
        "mlp1.0.weight": (4 * VIT,),
        "mlp1.0.bias": (4 * VIT,),
        "mlp1.1.weight": (LLM, 4 * VIT),
        "mlp1.1.bias": (LLM,),
        "mlp1.3.weight": (LLM, LLM),
        "mlp1.3.bias": (LLM,),
        "language_model.model.embed_tokens.weight": (512, LLM),
        "language_model.lm_head.weight": (512, LLM),
    }
    per_layer = {"attn.qkv.weight": (3 * VIT, VIT), "attn.proj.weight": (VIT, VIT)}
    per_layer |= {
        "attn.proj.bias": (VIT,),
        "mlp.fc1.weight": (INNER, VIT),
        "mlp.fc1.bias": (INNER,),
    }
    per_layer |= {"mlp.fc2.weight": (VIT, INNER), "mlp.fc2.bias": (VIT,), "ls1": (VIT,)}
    per_layer |= {"ls2": (VIT,), "norm1.weight": (VIT,), "norm2.weight": (VIT,)}
    if layout == "6b":
        per_layer |= {"attn.q_norm.weight": (VIT,), "attn.k_norm.weight": (VIT,)}
    else:
        per_layer |= {"attn.qkv.bias": (3 * VIT,), "norm1.bias": (VIT,), "norm2.bias": (VIT,)}
    for i in range(num_layers):
        shapes |= {f"vision_model.encoder.layers.{i}.{k}": v for k, v in per_layer.items()}
    return shapes


def write_checkpoint(
    folder: Path,
    layout: str = "300m",
    *,
    num_layers: int = 2,
    ps_version: str = "v2",
    select_layer: int = -1,
    keep: Callable[[str], bool] = lambda key: True,
) -> dict[str, torch.Tensor]:
    """Write model.safetensors + config.json with random weights; returns the tensors written."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        key: torch.randn(shape, generator=gen) * 0.3  # [*shape]
        for key, shape in sorted(_original_shapes(layout, num_layers).items())
    }
    tensors = {k: v for k, v in tensors.items() if keep(k)}
    save_file(tensors, str(folder / "model.safetensors"))
    config = _config(
        layout, num_layers=num_layers, ps_version=ps_version, select_layer=select_layer
    )
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def _pixels(num_tiles: int, seed: int) -> torch.Tensor:
    return torch.randn(num_tiles, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def _to_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original keys -> InternVLModel keys (spec section 5 renames)."""
    return hf_vision_keys(tensors)


def _hf_model(arch: ModelArchitecture, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import InternVLConfig, InternVLModel, InternVLVisionConfig, Qwen2Config

    vision = arch.vision
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=vision.hidden_size,
            num_hidden_layers=vision.num_hidden_layers,
            num_attention_heads=vision.num_attention_heads,
            intermediate_size=vision.intermediate_size,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            norm_type=vision.norm_type,
            layer_norm_eps=vision.layer_norm_eps,
            attention_bias=vision.qkv_bias,
            use_qk_norm=vision.qk_normalization,
            use_mean_pooling=True,
        ),
        text_config=Qwen2Config(
            hidden_size=LLM, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
        ),
        downsample_ratio=arch.downsample_ratio,
        tie_word_embeddings=False,
    )
    model = InternVLModel._from_config(config, attn_implementation="eager").eval()
    result = model.load_state_dict(_to_hf(tensors), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("language_model.") for k in result.missing_keys)
    return model


@pytest.mark.parametrize("layout", ["300m", "6b"])
@pytest.mark.parametrize("select_layer", [-1, -2])
def test_matches_transformers(tmp_path: Path, layout: str, select_layer: int) -> None:
    tensors = write_checkpoint(tmp_path, layout, select_layer=select_layer)
    encoder = VisionEncoder.from_checkpoint(tmp_path, dtype=torch.float32)
    reference = _hf_model(encoder.arch, tensors)
    pixels = _pixels(3, seed=1)  # [3, 3, 56, 56]
    with torch.no_grad():
        want = reference.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=select_layer,
            vision_feature_select_strategy="default",
        )
        vit = encoder.vision_model(pixels)  # [3, 17, 32]
    got = encoder(pixels)  # [3, 4, 64]
    assert got.shape == (3, encoder.num_image_token, encoder.llm_hidden_size) == (3, 4, 64)
    if select_layer == -1:
        torch.testing.assert_close(vit, want.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, want.pooler_output, atol=1e-4, rtol=1e-4)


def test_v1_orders_tokens_column_major(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    v2 = VisionEncoder.from_checkpoint(tmp_path, dtype=torch.float32)
    v1_arch = v2.arch.model_copy(update={"ps_version": "v1"})
    v1 = VisionEncoder.from_checkpoint(tmp_path, dtype=torch.float32, arch=v1_arch)
    pixels = _pixels(2, seed=2)  # [2, 3, 56, 56]
    got_v1, got_v2 = v1(pixels), v2(pixels)  # [2, 4, 64] each
    # 2x2 token grid: v2 token i*2+j is v1 token j*2+i.
    torch.testing.assert_close(got_v1, got_v2[:, [0, 2, 1, 3]], atol=0, rtol=0)
    assert not torch.allclose(got_v1, got_v2)


def test_select_layer_minus_two_runs_one_layer_fewer(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "full", select_layer=-1)
    write_checkpoint(tmp_path / "second_to_last", select_layer=-2)
    # The same first layer, in a checkpoint and config that only have one.
    write_checkpoint(tmp_path / "one", keep=lambda k: ".layers.1." not in k)
    one_arch = ModelArchitecture.from_checkpoint(tmp_path / "one")
    one_arch = one_arch.model_copy(
        update={"vision": one_arch.vision.model_copy(update={"num_hidden_layers": 1})}
    )
    full = VisionEncoder.from_checkpoint(tmp_path / "full", dtype=torch.float32)
    skipped = VisionEncoder.from_checkpoint(tmp_path / "second_to_last", dtype=torch.float32)
    one = VisionEncoder.from_checkpoint(tmp_path / "one", dtype=torch.float32, arch=one_arch)
    assert len(skipped.vision_model.encoder.layers) == 1
    pixels = _pixels(2, seed=3)  # [2, 3, 56, 56]
    torch.testing.assert_close(skipped(pixels), one(pixels))
    assert not torch.allclose(skipped(pixels), full(pixels), atol=1e-3)


def test_select_layer_out_of_range(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, select_layer=-4)
    with pytest.raises(CheckpointError, match=r"select_layer is -4; must be in \[-3, 2\]"):
        VisionEncoder.from_checkpoint(tmp_path)


def test_missing_key_names_it(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, keep=lambda k: k != "vision_model.encoder.layers.1.attn.proj.weight")
    with pytest.raises(
        CheckpointError, match=r"vision_model\.encoder\.layers\.1\.attn\.proj\.weight"
    ):
        VisionEncoder.from_checkpoint(tmp_path)


def test_unexpected_key_names_it(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    # The 6B layout has q_norm; a 300M config must not silently ignore it.
    extra = {"vision_model.encoder.layers.0.attn.q_norm.weight": torch.ones(VIT)}  # [C]
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys .*layers\.0\.attn\.q_norm\.weight"):
        VisionEncoder.from_checkpoint(tmp_path)


def test_bf16_load_is_close_to_fp32(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, "6b")
    fp32 = VisionEncoder.from_checkpoint(tmp_path, dtype=torch.float32)
    bf16 = VisionEncoder.from_checkpoint(tmp_path)
    assert bf16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert not any(p.is_meta for p in bf16.parameters())
    pixels = _pixels(2, seed=4)  # [2, 3, 56, 56]
    got, want = bf16(pixels), fp32(pixels)  # [2, 4, 64] each
    assert got.dtype == torch.bfloat16
    assert not torch.equal(got.float(), want)
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_batching_across_images_equals_one_by_one(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, "6b")
    encoder = VisionEncoder.from_checkpoint(tmp_path, dtype=torch.float32)
    images = [_pixels(3, seed=5), _pixels(1, seed=6), _pixels(2, seed=7)]  # [k, 3, 56, 56] each
    alone = torch.cat([encoder.encode(tiles) for tiles in images])  # [6, 4, 64]
    together = encoder.encode(torch.cat(images))  # [6, 4, 64]
    chunked = encoder.encode(torch.cat(images).numpy(), max_batch_tiles=4)  # [6, 4, 64]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, alone, atol=1e-5, rtol=1e-5)
    empty = encoder.encode(np.zeros((0, 3, 56, 56), dtype=np.float32))  # [0, 4, 64]
    assert empty.shape == (0, 4, 64)


def test_encode_rejects_bad_input(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    encoder = VisionEncoder.from_checkpoint(tmp_path, dtype=torch.float32)
    with pytest.raises(InvalidRequestError, match="force_image_size 56"):
        encoder.encode(torch.zeros(1, 3, 42, 42))
    with pytest.raises(InvalidRequestError, match="max_batch_tiles is 0"):
        encoder.encode(_pixels(1, seed=0), max_batch_tiles=0)
    with pytest.raises(InvalidRequestError, match="dtype"):
        encoder.encode(torch.zeros(1, 3, 56, 56, dtype=torch.int16))
    with pytest.raises(InvalidRequestError, match=r"expected \[n_tiles, 56, 56, 3\]"):
        encoder.encode(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))  # CHW: not RGB tiles


def test_normalize_tiles_is_bit_exact_with_load_image_normalisation() -> None:
    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)  # [n, S, S, 3]
    tiles[0].reshape(-1, 3)[:256] = np.arange(256, dtype=np.uint8)[:, None]  # every byte value
    want = normalize_pixels([tiles], 16)  # [n, 3, 16, 16] float32
    got = normalize_tiles(torch.from_numpy(tiles)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_uint8_tiles_encode_exactly_as_normalised_pixels(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    encoder = VisionEncoder.from_checkpoint(tmp_path, dtype=torch.float32)
    tiles = np.random.default_rng(4).integers(0, 256, (5, 56, 56, 3), dtype=np.uint8)
    pixels = normalize_pixels([tiles], 56)  # what load_image hands model.chat
    want = encoder.encode(pixels)  # [5, num_image_token, D_llm]
    assert torch.equal(encoder.encode(tiles, max_batch_tiles=2), want)


@pytest.mark.parametrize("vit", ["300m", "6b"])
def test_loads_tiny_generator_checkpoint(tiny_checkpoint: Callable[..., Path], vit: str) -> None:
    path = tiny_checkpoint("internlm2", vit=vit)
    encoder = VisionEncoder.from_checkpoint(path, dtype=torch.float32)
    out = encoder.encode(_pixels(3, seed=8))  # [3, num_image_token, D_llm]
    assert out.shape == (3, encoder.num_image_token, encoder.llm_hidden_size)
    assert torch.isfinite(out).all()


@pytest.mark.gpu
def test_normalize_tiles_on_cuda_is_bit_exact() -> None:
    tiles = np.random.default_rng(5).integers(0, 256, (8, 448, 448, 3), dtype=np.uint8)
    want = normalize_pixels([tiles], 448)  # [8, 3, 448, 448] float32, on the CPU
    got = normalize_tiles(torch.from_numpy(tiles).cuda()).cpu().numpy()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
