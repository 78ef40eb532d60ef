"""Typed configuration: the checkpoint's architecture (read once from `config.json`) and sampling.

`ModelArchitecture.from_checkpoint(path)` parses the original `InternVLChatConfig` layout
(`vision_config`, `llm_config`, top-level tiling/template fields) into frozen pydantic models.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from internvl_core.errors import CheckpointError

LLMFamily = Literal["qwen2", "internlm2", "phi3", "llama"]
TemplateName = Literal["Hermes-2", "internlm2-chat", "phi3-chat"]

_ARCH_TO_FAMILY: dict[str, LLMFamily] = {
    "Qwen2ForCausalLM": "qwen2",
    "InternLM2ForCausalLM": "internlm2",
    "Phi3ForCausalLM": "phi3",
    "LlamaForCausalLM": "llama",
}

_FROZEN = ConfigDict(extra="forbid", frozen=True)


def env_flag(name: str, default: str = "") -> str:
    """The one place environment variables are read (STYLE.md: never to select classes)."""
    return os.environ.get(name, default)


class VisionArchitecture(BaseModel):
    """InternViT shape: 300M (LayerNorm, qkv bias) or 6B (RMSNorm, qk-norm over all heads)."""

    model_config = _FROZEN
    hidden_size: int = Field(description="ViT width C")
    num_hidden_layers: int = Field(description="number of encoder layers")
    num_attention_heads: int = Field(description="attention heads")
    intermediate_size: int = Field(description="MLP hidden width")
    image_size: int = Field(description="input tile side in pixels")
    patch_size: int = Field(description="patch side in pixels")
    num_channels: int = Field(default=3, description="input channels")
    norm_type: Literal["layer_norm", "rms_norm"] = Field(description="norm1/norm2 type")
    layer_norm_eps: float = Field(default=1e-6, description="eps of norm1/norm2 and qk-norm")
    qkv_bias: bool = Field(description="qkv projection has a bias")
    qk_normalization: bool = Field(description="RMSNorm on q and k over all heads")
    hidden_act: str = Field(default="gelu", description="MLP activation (exact GELU)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class RopeScaling(BaseModel):
    """`rope_scaling` of the LLM config; `type` is normalised (`su` -> `longrope`)."""

    model_config = _FROZEN
    type: Literal["linear", "dynamic", "longrope", "llama3"] = Field(description="scaling kind")
    factor: float | None = Field(default=None, description="linear/dynamic/llama3 factor")
    short_factor: tuple[float, ...] | None = Field(default=None, description="longrope short")
    long_factor: tuple[float, ...] | None = Field(default=None, description="longrope long")
    low_freq_factor: float | None = Field(default=None, description="llama3 low_freq_factor")
    high_freq_factor: float | None = Field(default=None, description="llama3 high_freq_factor")
    original_max_position_embeddings: int | None = Field(
        default=None, description="pre-extension context (longrope switch point, llama3)"
    )

    @classmethod
    def parse(cls, raw: dict[str, Any] | None, llm_raw: dict[str, Any]) -> RopeScaling | None:
        if not raw:
            return None
        kind = raw.get("rope_type", raw.get("type"))
        if kind in (None, "default"):
            return None
        if kind == "su":
            kind = "longrope"
        original = raw.get("original_max_position_embeddings") or llm_raw.get(
            "original_max_position_embeddings"
        )
        return cls(
            type=kind,
            factor=raw.get("factor"),
            short_factor=tuple(raw["short_factor"]) if raw.get("short_factor") else None,
            long_factor=tuple(raw["long_factor"]) if raw.get("long_factor") else None,
            low_freq_factor=raw.get("low_freq_factor"),
            high_freq_factor=raw.get("high_freq_factor"),
            original_max_position_embeddings=original,
        )


class LLMArchitecture(BaseModel):
    """Decoder shape, normalised across Qwen2 / InternLM2 / Phi-3 / Llama-Yi."""

    model_config = _FROZEN
    family: LLMFamily = Field(description="decoder family, from llm_config.architectures")
    hidden_size: int = Field(description="model width D")
    num_hidden_layers: int = Field(description="decoder layers")
    num_attention_heads: int = Field(description="query heads H")
    num_key_value_heads: int = Field(description="kv heads K")
    head_dim: int = Field(description="per-head width d")
    intermediate_size: int = Field(description="gated MLP width")
    vocab_size: int = Field(description="rows of the embedding and the head")
    rms_norm_eps: float = Field(description="RMSNorm eps")
    rope_theta: float = Field(description="RoPE base")
    rope_scaling: RopeScaling | None = Field(default=None, description="RoPE scaling, if any")
    max_position_embeddings: int = Field(description="trained context (after extension)")
    attention_bias: bool = Field(description="q/k/v projections carry a bias (Qwen2)")
    tie_word_embeddings: bool = Field(default=False, description="head shares embeddings")

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> LLMArchitecture:
        archs = raw.get("architectures") or []
        family = next((_ARCH_TO_FAMILY[a] for a in archs if a in _ARCH_TO_FAMILY), None)
        if family is None:
            raise CheckpointError(
                f"llm_config.architectures is {archs}; supported: {sorted(_ARCH_TO_FAMILY)}"
            )
        heads = raw["num_attention_heads"]
        rope_raw = raw.get("rope_scaling") or raw.get("rope_parameters")
        theta = raw.get("rope_theta")
        if theta is None and isinstance(raw.get("rope_parameters"), dict):
            theta = raw["rope_parameters"].get("rope_theta")
        if family == "qwen2":
            bias = True
        elif family == "internlm2":
            bias = bool(raw.get("bias", False))
        else:
            bias = bool(raw.get("attention_bias", False))
        return cls(
            family=family,
            hidden_size=raw["hidden_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            intermediate_size=raw["intermediate_size"],
            vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=RopeScaling.parse(rope_raw, raw),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            attention_bias=bias,
            # InternVLChatConfig forces an untied head; keep an explicit true only.
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)) and family != "qwen2",
        )


class ModelArchitecture(BaseModel):
    """Everything `config.json` of an InternVL checkpoint says that inference needs."""

    model_config = _FROZEN
    vision: VisionArchitecture = Field(description="InternViT shape")
    llm: LLMArchitecture = Field(description="decoder shape")
    template: TemplateName = Field(description="conversation template name")
    system_message: str | None = Field(default=None, description="config.system_message")
    ps_version: Literal["v1", "v2"] = Field(description="pixel shuffle token order")
    downsample_ratio: float = Field(default=0.5, description="pixel shuffle scale")
    force_image_size: int = Field(description="tile side in pixels")
    dynamic_image_size: bool = Field(description="dynamic tiling on (else one tile)")
    use_thumbnail: bool = Field(description="append a thumbnail when tiles > 1")
    min_dynamic_patch: int = Field(default=1, description="min tiles")
    max_dynamic_patch: int = Field(default=12, description="max tiles")
    select_layer: int = Field(default=-1, description="ViT hidden state used")
    torch_dtype: str = Field(default="bfloat16", description="dtype the weights were saved in")

    @model_validator(mode="after")
    def _check(self) -> ModelArchitecture:
        if self.force_image_size % self.vision.patch_size:
            raise ValueError("force_image_size must be a multiple of vision patch_size")
        return self

    @property
    def num_image_token(self) -> int:
        """Tokens per tile: (image / patch)^2 * downsample^2 (256 for 448 px)."""
        side = self.force_image_size // self.vision.patch_size
        return int(side * side * self.downsample_ratio**2)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelArchitecture:
        try:
            vraw = raw["vision_config"]
            lraw = raw["llm_config"]
        except KeyError as e:
            missing = e.args[0]
            raise CheckpointError(f"config.json lacks {missing!r} (not an InternVL config)") from e
        vision = VisionArchitecture(
            hidden_size=vraw["hidden_size"],
            num_hidden_layers=vraw["num_hidden_layers"],
            num_attention_heads=vraw["num_attention_heads"],
            intermediate_size=vraw["intermediate_size"],
            image_size=vraw.get("image_size", 448),
            patch_size=vraw.get("patch_size", 14),
            num_channels=vraw.get("num_channels", 3),
            norm_type=vraw.get("norm_type", "rms_norm"),
            layer_norm_eps=vraw.get("layer_norm_eps", 1e-6),
            qkv_bias=vraw.get("qkv_bias", False),
            qk_normalization=vraw.get("qk_normalization", False),
            hidden_act=vraw.get("hidden_act", "gelu"),
        )
        image_size = raw.get("force_image_size") or vision.image_size
        return cls(
            vision=vision,
            llm=LLMArchitecture.parse(lraw),
            template=raw.get("template", "Hermes-2"),
            system_message=raw.get("system_message"),
            # V1.2-era configs have no ps_version and behave as v1.
            ps_version=raw.get("ps_version", "v1"),
            downsample_ratio=raw.get("downsample_ratio", 0.5),
            force_image_size=image_size,
            dynamic_image_size=raw.get("dynamic_image_size", False),
            use_thumbnail=raw.get("use_thumbnail", False),
            min_dynamic_patch=raw.get("min_dynamic_patch", 1),
            max_dynamic_patch=raw.get("max_dynamic_patch", 6),
            select_layer=raw.get("select_layer", -1),
            torch_dtype=str(raw.get("torch_dtype") or lraw.get("torch_dtype") or "bfloat16"),
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelArchitecture:
        cfg = Path(path) / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{cfg} not found: not an InternVL checkpoint folder")
        return cls.from_dict(json.loads(cfg.read_text()))


class StructuredOutput(BaseModel):
    """The grammar a request's output must follow: OpenAI `response_format`, normalised.

    The schema is kept as canonical JSON text (compact, key order kept: the order of
    `properties` is the order the output must follow), so the model stays hashable and frozen.
    """

    model_config = _FROZEN
    type: Literal["json_object", "json_schema"] = Field(
        description="json_object: any JSON object; json_schema: JSON valid against json_schema"
    )
    json_schema: str | None = Field(
        default=None, description="the JSON schema as JSON text (a dict is serialised)"
    )

    @field_validator("json_schema", mode="before")
    @classmethod
    def _canonical(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from e
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> StructuredOutput:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required for type json_schema and only for it")
        return self

    @property
    def key(self) -> str:
        """Content hash: the compiled-grammar cache key."""
        text = f"{self.type}\n{self.json_schema or ''}"
        return hashlib.sha256(text.encode()).hexdigest()


class SamplingParams(BaseModel):
    """Per-request decoding controls; YAML defaults and HTTP requests parse into this one class."""

    model_config = _FROZEN
    max_tokens: int = Field(default=1024, ge=1, description="max new tokens")
    min_tokens: int = Field(default=0, ge=0, description="stop tokens are ignored before this")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus mass")
    top_k: int = Field(default=0, ge=0, description="0 disables top-k")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="min prob relative to max")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0, description="HF-style")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI-style")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI-style")
    structured_output: StructuredOutput | None = Field(
        default=None, description="grammar the output follows (response_format); None: free text"
    )
    seed: int | None = Field(
        default=None, ge=-(2**63), le=2**64 - 1, description="per-request RNG seed (64-bit)"
    )
    stop: tuple[str, ...] = Field(default=(), description="stop strings (not returned)")
    stop_token_ids: tuple[int, ...] = Field(default=(), description="extra stop ids")
    ignore_eos: bool = Field(default=False, description="do not stop at the template separator")
    logprobs: bool = Field(default=False, description="return the chosen token's logprob")
    top_logprobs: int = Field(default=0, ge=0, le=20, description="alternatives per position")
    skip_special_tokens: bool = Field(default=True, description="as the original decode")
    include_stop_str_in_output: bool = Field(
        default=False, description="keep the matched stop string / stop token's text (vLLM)"
    )
    spaces_between_special_tokens: bool = Field(
        default=True, description="slow (sentencepiece) decode joins added tokens with spaces"
    )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class EngineConfig(BaseModel):
    """Limits and KV sizing of one LLM replica (scheduler + paged KV + pipeline stages)."""

    model_config = _FROZEN
    block_size: int = Field(default=16, ge=1, description="tokens per KV block")
    num_kv_blocks: int | None = Field(
        default=None, ge=1, description="KV blocks per stage; None = size from the memory budget"
    )
    kv_cache_memory_bytes: int | None = Field(
        default=None, ge=1, description="KV budget per stage in bytes (CPU or explicit)"
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="fraction of GPU memory the replica may use"
    )
    max_num_seqs: int = Field(default=64, ge=1, description="sequences running at once")
    max_num_batched_tokens: int = Field(default=2048, ge=1, description="tokens per step")
    max_model_len: int = Field(default=8192, ge=1, description="prompt + output tokens")
    pp_size: int = Field(default=1, ge=1, description="pipeline stages")
    pp_transport: Literal["p2p", "object_store"] = Field(
        default="p2p",
        description="how hidden states hop between stage actors: torch.distributed P2P (gloo "
        "on CPU, NCCL on CUDA) or Ray's object store",
    )
    enable_prefix_caching: bool = Field(default=True, description="share full prompt blocks")
    enable_chunked_prefill: bool = Field(default=True, description="split long prefills")
    max_waiting_requests: int = Field(default=1024, ge=1, description="queue bound (503 past)")
    compile_decode: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="decode-only steps padded to batch buckets and run under torch.compile "
        "(CUDA: replayed as one CUDA graph per bucket, compiled and captured at start-up, their "
        "memory held back from the KV pool); auto = graphs on CUDA (with Triton: 3-7x eager on "
        "an H200, benchmarks/GPU_NOTES.md), off on the CPU (benchmarks/compile.py measures no "
        "gain worth the compile time there); 'on' opts in on the CPU too",
    )

    def max_model_len_for(self, llm: LLMArchitecture) -> int:
        """The context a replica serves: max_model_len capped by the checkpoint's trained
        max_position_embeddings. The engine, Preprocess's check and /v1/models all use it."""
        return min(self.max_model_len, llm.max_position_embeddings)
