"""RotaryEmbedding vs the rotary classes shipped in transformers (default, linear, llama3, dynamic,
longrope), plus the rotate-half application."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from internvl_core.config import LLMArchitecture, RopeScaling
from internvl_core.model.attention_metadata import AttentionMetadata
from internvl_core.model.rope import RotaryEmbedding, apply_rotary

HEAD_DIM, HEADS = 16, 4
EXACT = {"rtol": 0.0, "atol": 0.0}


def _arch(family: str = "llama", *, scaling: RopeScaling | None = None, max_pos: int = 4096):
    return LLMArchitecture(
        family=family,
        hidden_size=HEAD_DIM * HEADS,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        intermediate_size=128,
        vocab_size=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        attention_bias=False,
    )


def _one_sequence(positions: torch.Tensor, long: bool | None = None) -> AttentionMetadata:
    """Metadata of a single forward over `positions` (only lengths and the rope mask matter)."""
    seq_len = int(positions.max()) + 1
    mask = None if long is None else torch.full((positions.numel(),), long)
    blocks = list(range(-(-seq_len // 16)))
    return AttentionMetadata.for_contiguous(
        [positions.numel()], [seq_len], [blocks], 16, long_rope_mask=mask
    )


def _hf_cos_sin(rotary: torch.nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = torch.zeros(1, positions.numel(), HEAD_DIM)  # only dtype/device matter
    cos, sin = rotary(x, positions[None])  # [1, T, d] each
    return cos[0], sin[0]


def _llama_config(rope_parameters: dict, max_pos: int = 4096) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HEAD_DIM * HEADS,
        num_attention_heads=HEADS,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
    )


@pytest.mark.parametrize(
    ("scaling", "hf_params"),
    [
        (None, {"rope_type": "default"}),
        (RopeScaling(type="linear", factor=2.0), {"rope_type": "linear", "factor": 2.0}),
        (
            RopeScaling(
                type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ],
    ids=["default", "linear", "llama3"],
)
def test_static_kinds_match_transformers(scaling: RopeScaling | None, hf_params: dict) -> None:
    ours = RotaryEmbedding(_arch(scaling=scaling))
    reference = LlamaRotaryEmbedding(_llama_config(hf_params))
    positions = torch.tensor([0, 1, 2, 5, 17, 300, 4095])
    cos, sin = ours.cos_sin(positions, _one_sequence(positions), dtype=torch.float32)
    hf_cos, hf_sin = _hf_cos_sin(reference, positions)
    torch.testing.assert_close(cos, hf_cos, **EXACT)
    torch.testing.assert_close(sin, hf_sin, **EXACT)


def test_dynamic_ntk_is_default_up_to_max_positions() -> None:
    dynamic = RotaryEmbedding(_arch("internlm2", scaling=RopeScaling(type="dynamic", factor=2.0)))
    default = RotaryEmbedding(_arch("internlm2"))
    positions = torch.arange(0, 4096, 7)
    attn = _one_sequence(positions)
    for ours, ref in zip(
        dynamic.cos_sin(positions, attn, dtype=torch.float32),
        default.cos_sin(positions, attn, dtype=torch.float32),
        strict=True,
    ):
        torch.testing.assert_close(ours, ref, **EXACT)


def test_dynamic_ntk_beyond_max_positions_uses_stretched_base() -> None:
    max_pos, seq_len = 256, 400
    arch = _arch("internlm2", scaling=RopeScaling(type="dynamic", factor=2.0), max_pos=max_pos)
    positions = torch.arange(seq_len)
    cos, _ = RotaryEmbedding(arch).cos_sin(positions, _one_sequence(positions), dtype=torch.float32)
    config = _llama_config({"rope_type": "dynamic", "factor": 2.0}, max_pos=max_pos)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, None, seq_len=seq_len)  # [d/2]
    freqs = positions[:, None].float() * inv_freq  # [T, d/2]
    torch.testing.assert_close(cos, torch.cat((freqs, freqs), -1).cos(), **EXACT)


def _phi3_pair() -> tuple[RotaryEmbedding, Phi3RotaryEmbedding]:
    half = HEAD_DIM // 2
    short = [1.0 + 0.05 * i for i in range(half)]
    long = [1.0 + 3.0 * i for i in range(half)]
    scaling = RopeScaling(
        type="longrope", short_factor=short, long_factor=long, original_max_position_embeddings=4096
    )
    config = Phi3Config(
        hidden_size=HEAD_DIM * HEADS,
        num_attention_heads=HEADS,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        pad_token_id=None,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": short,
            "long_factor": long,
            "original_max_position_embeddings": 4096,
        },
    )
    return RotaryEmbedding(_arch("phi3", scaling=scaling, max_pos=131072)), Phi3RotaryEmbedding(
        config
    )


@pytest.mark.parametrize("last_position", [100, 4095, 4096, 5000])
def test_longrope_switch_matches_transformers_per_forward(last_position: int) -> None:
    ours, reference = _phi3_pair()
    positions = torch.tensor([0, 3, 64, last_position])
    # the original rule: long factors when max(position) + 1 > original_max_position_embeddings
    long = last_position + 1 > 4096
    cos, sin = ours.cos_sin(positions, _one_sequence(positions, long), dtype=torch.float32)
    hf_cos, hf_sin = _hf_cos_sin(reference, positions)
    torch.testing.assert_close(cos, hf_cos, **EXACT)
    torch.testing.assert_close(sin, hf_sin, **EXACT)
    assert ours.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))


def test_longrope_mask_selects_factors_per_token() -> None:
    ours, _ = _phi3_pair()
    positions = torch.tensor([10, 11, 12, 13])
    mask = torch.tensor([False, True, False, True])
    attn = AttentionMetadata.for_contiguous([2, 2], [12, 14], [[0], [1]], 16, long_rope_mask=mask)
    cos, _ = ours.cos_sin(positions, attn, dtype=torch.float32)
    short, _ = ours.cos_sin(positions, _one_sequence(positions, False), dtype=torch.float32)
    long, _ = ours.cos_sin(positions, _one_sequence(positions, True), dtype=torch.float32)
    torch.testing.assert_close(cos[mask], long[mask], **EXACT)
    torch.testing.assert_close(cos[~mask], short[~mask], **EXACT)


def test_cast_to_model_dtype_after_float32_math() -> None:
    ours = RotaryEmbedding(_arch())
    positions = torch.arange(2000, 2010)
    attn = _one_sequence(positions)
    cos16, _ = ours.cos_sin(positions, attn, dtype=torch.bfloat16)
    cos32, _ = ours.cos_sin(positions, attn, dtype=torch.float32)
    assert cos16.dtype == torch.bfloat16
    torch.testing.assert_close(cos16, cos32.to(torch.bfloat16), **EXACT)


def test_apply_rotary_matches_transformers() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, HEADS, HEAD_DIM, generator=gen)  # [T, H, d]
    k = torch.randn(5, 2, HEAD_DIM, generator=gen)  # [T, K, d]
    positions = torch.arange(5)
    cos, sin = RotaryEmbedding(_arch()).cos_sin(
        positions, _one_sequence(positions), dtype=torch.float32
    )
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    # transformers layout: [B, heads, T, d] with cos/sin [B, T, d]
    hf_q, hf_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None]
    )
    torch.testing.assert_close(q_rot, hf_q[0].transpose(0, 1), **EXACT)
    torch.testing.assert_close(k_rot, hf_k[0].transpose(0, 1), **EXACT)
