"""config.json parsing into ModelArchitecture and SamplingParams validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from internvl_core.config import ModelArchitecture, SamplingParams
from internvl_core.errors import CheckpointError

VISION = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "image_size": 448,
    "patch_size": 14,
    "norm_type": "layer_norm",
    "qkv_bias": True,
    "qk_normalization": False,
}
INTERNLM2 = {
    "architectures": ["InternLM2ForCausalLM"],
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 92553,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "max_position_embeddings": 32768,
    "bias": False,
}
PHI3 = {
    "architectures": ["Phi3ForCausalLM"],
    "hidden_size": 3072,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 8192,
    "vocab_size": 32020,
    "rope_theta": 10000.0,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_scaling": {"type": "su", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
}


def _config(llm: dict, **top: object) -> dict:
    base = {
        "vision_config": VISION,
        "llm_config": llm,
        "template": "internlm2-chat",
        "ps_version": "v2",
        "force_image_size": 448,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
    }
    base.update(top)
    return base


def test_internvl2_8b_like_config() -> None:
    arch = ModelArchitecture.from_dict(_config(INTERNLM2))
    assert arch.llm.family == "internlm2"
    assert arch.llm.head_dim == 128
    assert arch.llm.rope_scaling is not None and arch.llm.rope_scaling.type == "dynamic"
    assert arch.num_image_token == 256
    assert arch.vision.head_dim == 64


def test_phi3_su_becomes_longrope() -> None:
    arch = ModelArchitecture.from_dict(_config(PHI3, template="phi3-chat"))
    scaling = arch.llm.rope_scaling
    assert scaling is not None and scaling.type == "longrope"
    assert scaling.original_max_position_embeddings == 4096
    assert scaling.long_factor is not None and len(scaling.long_factor) == 48


def test_v12_defaults_to_v1_and_no_dynamic() -> None:
    raw = _config(INTERNLM2)
    for key in ("ps_version", "dynamic_image_size", "use_thumbnail"):
        raw.pop(key)
    arch = ModelArchitecture.from_dict(raw)
    assert arch.ps_version == "v1"
    assert not arch.dynamic_image_size and not arch.use_thumbnail


def test_unknown_llm_architecture_named() -> None:
    with pytest.raises(CheckpointError, match="MistralForCausalLM"):
        ModelArchitecture.from_dict(_config({**INTERNLM2, "architectures": ["MistralForCausalLM"]}))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        ModelArchitecture.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="vision_config"):
        ModelArchitecture.from_checkpoint(tmp_path)


def test_sampling_params_frozen_and_validated() -> None:
    params = SamplingParams(temperature=0.0)
    assert params.greedy
    updated = params.model_copy(update={"temperature": 0.7})
    assert not updated.greedy
    with pytest.raises(ValidationError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValidationError):
        SamplingParams(unknown_field=1)  # type: ignore[call-arg]
