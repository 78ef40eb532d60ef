"""`ServeArgs`: the one config tree `build_app` validates (YAML `args:` and `key=value` CLI alike).

In: a dict from the YAML or the `serve run` command line. Out: frozen, validated settings for
every deployment: model, engine limits, vision batching, media limits, defaults and scaling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class AutoscalingOptions(BaseModel):
    """Subset of Serve's autoscaling_config we set per deployment."""

    model_config = _FROZEN
    min_replicas: int = Field(default=1, ge=0, description="lower bound")
    max_replicas: int = Field(default=1, ge=1, description="upper bound")
    target_ongoing_requests: float = Field(default=2.0, gt=0, description="per replica")
    upscale_delay_s: float = Field(default=30.0, ge=0, description="before adding replicas")
    downscale_delay_s: float = Field(default=600.0, ge=0, description="before removing")
    look_back_period_s: float = Field(default=30.0, gt=0, description="metrics window")
    metrics_interval_s: float = Field(default=10.0, gt=0, description="metrics push period")
    policy: Literal["ongoing_requests", "queued_tiles", "engine_queue"] = Field(
        default="ongoing_requests",
        description="ongoing_requests: Serve's default (target_ongoing_requests); queued_tiles "
        "(vision_encoder only): tiles waiting for or in an encoder batch; engine_queue (llm "
        "only): waiting sequences and KV use",
    )
    target_tiles_per_replica: float = Field(
        default=256.0, gt=0, description="queued_tiles: pending tiles one vision replica holds"
    )
    target_waiting_per_replica: float = Field(
        default=8.0, gt=0, description="engine_queue: waiting sequences per LLM replica"
    )
    target_kv_usage: float = Field(
        default=0.85, gt=0, le=1, description="engine_queue: fraction of KV blocks in use"
    )


class DeploymentOptions(BaseModel):
    """Typed Serve options of one deployment (applied with `.options()` in build_app)."""

    model_config = _FROZEN
    num_replicas: int | None = Field(default=1, ge=1, description="fixed count (or autoscaling)")
    autoscaling: AutoscalingOptions | None = Field(default=None, description="replaces count")
    max_ongoing_requests: int = Field(default=16, ge=1, description="per replica concurrency")
    max_queued_requests: int = Field(default=64, ge=-1, description="caller-side queue; -1 = off")
    # Fractions by default: the four default deployments (1.75 CPUs) fit a 2-CPU machine;
    # the GPU YAMLs reserve whole CPUs where the work needs them.
    num_cpus: float = Field(default=0.5, ge=0, description="CPUs per replica (Ray reservation)")
    num_gpus: float | Literal["auto"] = Field(
        default=0.0, description="GPUs per replica; auto = 1 when the cluster has GPUs, else 0"
    )
    health_check_period_s: float = Field(default=10.0, gt=0, description="check_health period")
    health_check_timeout_s: float = Field(default=30.0, gt=0, description="check_health limit")
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0, description="drain time")


class VisionServeConfig(BaseModel):
    """Vision pool batching, embedding cache and health probe."""

    model_config = _FROZEN
    max_batch_tiles: int = Field(
        default=64,
        ge=1,
        description="tiles per encoder batch; an image with more tiles (up to max_dynamic_patch "
        "40 + thumbnail = 41) is encoded in chunks of this many, so any value >= 1 serves every "
        "legal request",
    )
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, description="wait to fill a batch")
    cache_bytes: ByteSize = Field(
        default=ByteSize(2**30),
        description="embedding cache bound in bytes (int or '4GiB'), LRU; 0 = off. The "
        "VisionEncoder replica reserves this much Ray `memory`. One 13-tile image is "
        "3,328 rows x D_llm x 2 B in bf16: ~54 MB for the 76B (D 8192), ~6 MB for the 1B",
    )
    health_encode_interval_s: float = Field(
        default=30.0,
        ge=0,
        description="check_health encodes one tile at most this often (a batch that succeeded "
        "within the interval counts as a pass)",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_cache_entries(cls, data: Any) -> Any:
        """The entry bound let a 76B replica hold 512 x 54 MB; name the field that replaced it."""
        if isinstance(data, dict) and "cache_entries" in data:
            raise ValueError(
                "vision.cache_entries was replaced by vision.cache_bytes (a bound in bytes, "
                "e.g. cache_bytes: 4GiB; 0 = off)"
            )
        return data


class MediaLimits(BaseModel):
    """Limits checked in Preprocess before any GPU work; every refusal names its limit."""

    model_config = _FROZEN
    max_dynamic_patch: int | None = Field(
        default=None, ge=1, le=40, description="default max tiles per image (None = config.json)"
    )
    max_tiles_per_request: int = Field(default=128, ge=1, description="total tile budget")
    max_images_per_request: int = Field(default=16, ge=0, description="images + video frames")
    max_image_pixels: int = Field(default=50_000_000, ge=1, description="width x height")
    max_image_bytes: int = Field(default=20 * 2**20, ge=1, description="bytes per image")
    max_video_bytes: int = Field(default=200 * 2**20, ge=1, description="bytes per video")
    max_num_segments: int = Field(default=32, ge=1, description="frames per video")
    max_video_duration_s: float = Field(default=3600.0, gt=0, description="seconds per video")
    fetch_timeout_s: float = Field(default=10.0, gt=0, description="connect + read timeout")
    max_concurrent_fetches: int = Field(default=16, ge=1, description="per replica")
    trusted_networks: tuple[str, ...] = Field(
        default=(), description="CIDRs fetched from even though private (internal media hosts)"
    )
    allowed_domains: tuple[str, ...] = Field(default=(), description="empty = any public host")
    local_media_dir: str | None = Field(
        default=None, description="file:// and paths allowed only under this directory"
    )


class ServeArgs(BaseModel):
    """Root of the serving config; `build_app(args)` validates it and fails naming the field."""

    model_config = _FROZEN
    model_path: str = Field(description="original InternVL checkpoint folder")
    served_model_name: str | None = Field(default=None, description="default: folder name")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto = bfloat16 on GPU, float32 on CPU"
    )
    quantization: Literal["8bit", "4bit"] | None = Field(
        default=None, description="bitsandbytes weights for the decoder's linear layers"
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="LLM replica")
    vision: VisionServeConfig = Field(default_factory=VisionServeConfig, description="pool")
    media: MediaLimits = Field(default_factory=MediaLimits, description="input limits")
    default_sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(max_tokens=512),
        description="defaults a request's fields override",
    )
    use_gpus: Literal["auto"] | bool = Field(
        default="auto",
        description="whether `num_gpus: auto` deployments take a GPU: auto = when the Ray "
        "cluster has GPUs (decided once connected, never from this machine's CUDA)",
    )
    keep_grounding_tokens: bool = Field(
        default=True,
        description="answers keep <ref>/<box> tags (as the original demo) and carry parsed boxes",
    )
    stream_interval_s: float = Field(
        default=0.05, ge=0, description="SSE: steps arriving within this interval share a chunk"
    )
    # API keys: any source on turns the check on for /v1/*; the keys are the union of all.
    api_keys: tuple[SecretStr, ...] = Field(
        default=(),
        description="accepted `Authorization: Bearer` keys; prefer api_keys_file/api_keys_env, "
        "which keep keys out of configs and Serve's logs of app args",
    )
    api_keys_file: str | None = Field(
        default=None, description="file with one key per line (blank and # lines skipped)"
    )
    api_keys_env: str | None = Field(
        default=None, description="name of an environment variable holding comma-separated keys"
    )
    ingress: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_ongoing_requests=256, num_cpus=0.25),
        description="HTTP ingress",
    )
    preprocess: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_ongoing_requests=32),
        description="CPU preprocessing",
    )
    vision_encoder: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_ongoing_requests=64, num_gpus="auto"),
        description="vision pool (1 GPU each when the cluster has GPUs)",
    )
    llm: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_ongoing_requests=128, num_gpus="auto"),
        description="LLM replicas (pp_size GPU bundles each when the cluster has GPUs)",
    )

    @field_validator("model_path")
    @classmethod
    def _path_exists(cls, value: str) -> str:
        if not (Path(value) / "config.json").is_file():
            raise ValueError(f"{value!r} has no config.json (not a checkpoint folder)")
        return value

    @model_validator(mode="after")
    def _stages_fit_layers(self) -> ServeArgs:
        """Refuse at deploy time what every LLM replica would fail on at start: a stage with
        no decoder layer (Serve would retry the failing replica instead of naming the field)."""
        num_layers = ModelArchitecture.from_checkpoint(self.model_path).llm.num_hidden_layers
        if self.engine.pp_size > num_layers:
            raise ValueError(
                f"engine.pp_size is {self.engine.pp_size}; the decoder has {num_layers} layers "
                "and every stage needs at least one"
            )
        return self

    @model_validator(mode="after")
    def _policies_fit_deployments(self) -> ServeArgs:
        """queued_tiles reads the vision pool's metric and engine_queue the LLM engine's; on
        another deployment they would never see a report and never scale."""
        owner = {"queued_tiles": "vision_encoder", "engine_queue": "llm"}
        for name in ("ingress", "preprocess", "vision_encoder", "llm"):
            autoscaling = getattr(self, name).autoscaling
            if autoscaling is None or autoscaling.policy == "ongoing_requests":
                continue
            if owner[autoscaling.policy] != name:
                raise ValueError(
                    f"{name}.autoscaling.policy is {autoscaling.policy!r}; it applies only to "
                    f"{owner[autoscaling.policy]} (use ongoing_requests here)"
                )
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_path).resolve().name

    @property
    def max_model_len(self) -> int:
        """The effective context (engine.max_model_len capped by the checkpoint's
        max_position_embeddings): what /v1/models reports and every stage enforces."""
        arch = ModelArchitecture.from_checkpoint(self.model_path)
        return self.engine.max_model_len_for(arch.llm)
