"""InternViT: both layouts against transformers' InternVLVisionModel; layer subsets; names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from internvl_core.config import VisionArchitecture
from internvl_core.errors import CheckpointError
from internvl_core.vision.intern_vit import InternRMSNorm, InternViT
from tests.hf_reference import hf_vision_keys

LAYOUTS = ("300m", "6b")


def tiny_vision_arch(layout: str, *, num_hidden_layers: int = 2) -> VisionArchitecture:
    """ViT hidden 32, 2 heads of 16, MLP 64, 56 px tiles of 14 px patches (4x4 grid)."""
    is_6b = layout == "6b"
    return VisionArchitecture(
        hidden_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=56,
        patch_size=14,
        norm_type="rms_norm" if is_6b else "layer_norm",
        qkv_bias=not is_6b,
        qk_normalization=is_6b,
    )


def randomize(module: nn.Module, seed: int) -> None:
    """Give every parameter (layer scales and norm weights included) random, non-trivial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)  # [*param.shape]


def to_hf_vision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original InternViT names (no `vision_model.` prefix) -> InternVLVisionModel names."""
    prefixed = {f"vision_model.{key}": tensor for key, tensor in state.items()}
    return {k.removeprefix("vision_tower."): v for k, v in hf_vision_keys(prefixed).items()}


def hf_vision_model(arch: VisionArchitecture, state: dict[str, torch.Tensor]) -> nn.Module:
    from transformers import InternVLVisionConfig, InternVLVisionModel

    config = InternVLVisionConfig(
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        norm_type=arch.norm_type,
        layer_norm_eps=arch.layer_norm_eps,
        attention_bias=arch.qkv_bias,
        use_qk_norm=arch.qk_normalization,
        use_mean_pooling=True,
    )
    model = InternVLVisionModel._from_config(config, attn_implementation="eager")
    model.load_state_dict(to_hf_vision(state), strict=True)
    return model.eval()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("image_size", [56, 42])
def test_matches_transformers(layout: str, image_size: int) -> None:
    # 42 px is not the trained size: position embeddings are bicubically resized in both.
    arch = tiny_vision_arch(layout)
    ours = InternViT(arch).eval()
    randomize(ours, seed=1)
    reference = hf_vision_model(arch, ours.state_dict())
    pixels = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    # pixels: [3, 3, S, S]
    with torch.no_grad():
        got = ours(pixels)  # [3, 1 + (S/14)^2, 32]
        want = reference(pixel_values=pixels).last_hidden_state  # [3, 1 + (S/14)^2, 32]
    assert got.shape == (3, 1 + (image_size // 14) ** 2, 32)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fewer_layers_equal_earlier_hidden_state(layout: str) -> None:
    arch = tiny_vision_arch(layout, num_hidden_layers=3)
    full = InternViT(arch).eval()
    randomize(full, seed=3)
    reference = hf_vision_model(arch, full.state_dict())
    partial = InternViT(arch, num_layers=2).eval()
    kept = {k: v for k, v in full.state_dict().items() if not k.startswith("encoder.layers.2.")}
    partial.load_state_dict(kept, strict=True)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))  # [2, 3, 56, 56]
    with torch.no_grad():
        got = partial(pixels)  # [2, 17, 32]
        hidden_states = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden_states) == 4  # embeddings + 3 layers
    torch.testing.assert_close(got, hidden_states[-2], atol=1e-4, rtol=1e-4)
    embeddings_only = InternViT(arch, num_layers=0).eval()
    embeddings_only.load_state_dict(
        {k: v for k, v in kept.items() if k.startswith("embeddings.")}, strict=True
    )
    with torch.no_grad():
        torch.testing.assert_close(embeddings_only(pixels), hidden_states[0], atol=1e-5, rtol=1e-5)


def test_parameter_names_follow_checkpoint_keys() -> None:
    per_layer_300m = {
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "norm1.weight",
        "norm1.bias",
        "norm2.weight",
        "norm2.bias",
        "ls1",
        "ls2",
    }
    per_layer_6b = (per_layer_300m - {"attn.qkv.bias", "norm1.bias", "norm2.bias"}) | {
        "attn.q_norm.weight",
        "attn.k_norm.weight",
    }
    embeddings = {
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.patch_embedding.bias",
        "embeddings.position_embedding",
    }
    for layout, per_layer in (("300m", per_layer_300m), ("6b", per_layer_6b)):
        model = InternViT(tiny_vision_arch(layout))
        expected = embeddings | {f"encoder.layers.{i}.{k}" for i in range(2) for k in per_layer}
        assert set(model.state_dict()) == expected, layout
    shapes = dict(InternViT(tiny_vision_arch("6b")).state_dict().items())
    assert shapes["embeddings.position_embedding"].shape == (1, 17, 32)
    assert shapes["embeddings.class_embedding"].shape == (1, 1, 32)
    assert shapes["encoder.layers.0.attn.qkv.weight"].shape == (96, 32)
    assert shapes["encoder.layers.0.attn.q_norm.weight"].shape == (32,)


def test_rms_norm_in_fp32_then_cast_then_weight() -> None:
    gen = torch.Generator().manual_seed(5)
    norm = InternRMSNorm(32, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=gen))  # [32]
    x = (torch.randn(4, 32, generator=gen) * 3).to(torch.bfloat16)  # [4, 32]
    x32 = x.float()  # [4, 32]
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    # normed: [4, 32]
    got = norm(x)  # [4, 32]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, norm.weight * normed, atol=0, rtol=0)


def test_qk_norm_spans_all_heads() -> None:
    # Scaling one head's q slice changes the other head's normalised q only if the RMS is
    # computed over all heads flattened (per-head norm would leave it unchanged).
    arch = tiny_vision_arch("6b")
    attn = InternViT(arch).encoder.layers[0].attn
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(6))  # [1, 5, 32]
    q = attn.qkv(x)[..., :32]  # [1, 5, 32]
    scaled = q.clone()  # [1, 5, 32]
    scaled[..., :16] *= 10
    with torch.no_grad():
        before, after = attn.q_norm(q), attn.q_norm(scaled)  # [1, 5, 32] each
    assert not torch.allclose(before[..., 16:], after[..., 16:])


def test_invalid_layer_count_names_the_limit() -> None:
    with pytest.raises(CheckpointError, match=r"num_layers is 3; must be in \[0, 2\]"):
        InternViT(tiny_vision_arch("300m"), num_layers=3)
