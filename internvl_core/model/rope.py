"""Rotary position embeddings (rotate-half layout) for every decoder family and scaling kind.

Positions [num_tokens] (+ per-sequence facts from AttentionMetadata) -> cos/sin [num_tokens,
head_dim] in the model dtype, computed in float32 as transformers / the original remote code do.
"""

from __future__ import annotations

import math

import torch

from internvl_core.config import LLMArchitecture
from internvl_core.errors import CheckpointError
from internvl_core.model.attention_metadata import AttentionMetadata


class RotaryEmbedding:
    """cos/sin tables for one decoder; stateless per call (no growing caches).

    Kinds (`arch.rope_scaling.type`):
    - none / `linear` / `llama3`: transformers' formulas.
    - `dynamic` (InternLM2 NTK): identical to the default at or below `max_position_embeddings`.
      Beyond it, a sequence of length L uses `base * (factor*L/max - (factor-1)) ** (d/(d-2))` for
      the tokens of that forward. The original is stateful (its cache only grows, so a later short
      request keeps the stretched base); we do not reproduce that, and the engine caps
      max_model_len at max positions, where both agree.
    - `longrope` (Phi-3 `su`): per token, long or short factors by `attn.long_rope_mask`; cos/sin
      scaled by `sqrt(1 + ln(max/orig) / ln(orig))` when max > orig.
    """

    def __init__(self, arch: LLMArchitecture) -> None:
        self.head_dim = arch.head_dim
        self.base = arch.rope_theta
        self.max_position_embeddings = arch.max_position_embeddings
        self.scaling = arch.rope_scaling
        self.kind = self.scaling.type if self.scaling is not None else "default"
        self.attention_factor = 1.0
        if self.kind in ("linear", "dynamic", "llama3") and self.scaling.factor is None:
            raise CheckpointError(
                f"rope_scaling.factor is required for rope_scaling.type {self.kind}"
            )
        if self.kind == "longrope":
            self._check_longrope()
            original = self.scaling.original_max_position_embeddings
            ratio = self.max_position_embeddings / original
            if ratio > 1.0:
                self.attention_factor = math.sqrt(1 + math.log(ratio) / math.log(original))
        self._inv_freq_cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _check_longrope(self) -> None:
        half = self.head_dim // 2
        for name in ("short_factor", "long_factor"):
            factors = getattr(self.scaling, name)
            if factors is None or len(factors) != half:
                got = None if factors is None else len(factors)
                raise CheckpointError(
                    f"rope_scaling.{name} has {got} entries; head_dim/2 is {half}"
                )
        if self.scaling.original_max_position_embeddings is None:
            raise CheckpointError("rope_scaling.original_max_position_embeddings is required")

    def _exponents(self, device: torch.device) -> torch.Tensor:
        # [head_dim / 2] float32: 2i / d
        return torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / (
            self.head_dim
        )

    def _default_inv_freq(self, device: torch.device) -> torch.Tensor:
        return 1.0 / (self.base ** self._exponents(device))  # [head_dim / 2]

    def _llama3_inv_freq(self, device: torch.device) -> torch.Tensor:
        # follows https://github.com/huggingface/transformers/blob/main/src/transformers/modeling_rope_utils.py
        scaling = self.scaling
        inv_freq = self._default_inv_freq(device)  # [head_dim / 2]
        factor = scaling.factor
        low, high = scaling.low_freq_factor or 1.0, scaling.high_freq_factor or 4.0
        old_len = scaling.original_max_position_embeddings or self.max_position_embeddings
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq  # [head_dim / 2]
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)  # [head_dim / 2]

    def inv_freq(self, name: str, device: torch.device) -> torch.Tensor:
        """Cached float32 inverse frequencies [head_dim / 2]: `base`, `short` or `long`."""
        key = (name, device)
        if key not in self._inv_freq_cache:
            if name == "long" or name == "short":
                factors = self.scaling.long_factor if name == "long" else self.scaling.short_factor
                ext = torch.tensor(factors, dtype=torch.float32, device=device)  # [head_dim / 2]
                value = 1.0 / (ext * self.base ** self._exponents(device))
            elif self.kind == "linear":
                value = self._default_inv_freq(device)
                value /= self.scaling.factor
            elif self.kind == "llama3":
                value = self._llama3_inv_freq(device)
            else:
                value = self._default_inv_freq(device)
            self._inv_freq_cache[key] = value
        return self._inv_freq_cache[key]

    def _token_inv_freq(self, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """Per-token inverse frequencies: [head_dim / 2] shared, or [num_tokens, head_dim / 2]."""
        device = positions.device
        if self.kind == "longrope":
            short = self.inv_freq("short", device)
            if attn.long_rope_mask is None:
                return short
            long = self.inv_freq("long", device)
            mask = attn.long_rope_mask.to(device=device, dtype=torch.bool)[:, None]  # [T, 1]
            return torch.where(mask, long, short)  # [T, head_dim / 2]
        if self.kind == "dynamic" and max(attn.seq_lens, default=0) > self.max_position_embeddings:
            return self._dynamic_inv_freq(attn, device)
        return self.inv_freq("base", device)

    def _dynamic_inv_freq(self, attn: AttentionMetadata, device: torch.device) -> torch.Tensor:
        factor, max_pos, dim = self.scaling.factor, self.max_position_embeddings, self.head_dim
        rows: list[torch.Tensor] = []
        for q_len, s_len in zip(attn.query_lens, attn.seq_lens, strict=True):
            seq_len = max(s_len, max_pos)
            base = self.base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            inv = 1.0 / (base ** self._exponents(device))  # [head_dim / 2]
            rows.append(inv.expand(q_len, -1))  # [q_len, head_dim / 2]
        return torch.cat(rows, dim=0)  # [T, head_dim / 2]

    def cos_sin(
        self, positions: torch.Tensor, attn: AttentionMetadata, *, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [num_tokens, head_dim] for `positions` [num_tokens] int64, cast to `dtype`."""
        inv_freq = self._token_inv_freq(positions, attn)  # [head_dim/2] or [T, head_dim/2]
        return self._rotate_tables(positions, inv_freq, dtype=dtype)

    def prepare_decode(self, device: torch.device) -> None:
        """Fill the inverse-frequency cache eagerly, so a traced `decode_cos_sin` only reads it."""
        for name in ("short", "long") if self.kind == "longrope" else ("base",):
            self.inv_freq(name, device)

    def decode_cos_sin(
        self, positions: torch.Tensor, long_mask: torch.Tensor | None, *, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Traceable cos, sin [B, head_dim] for one token per row (no host reads, no branching
        on tensor values). `dynamic` uses the base frequencies: equal to the original up to
        max_position_embeddings, which caps the engine's context. Call `prepare_decode` first.
        """
        device = positions.device
        if self.kind == "longrope":
            inv_freq = self.inv_freq("short", device)  # [head_dim / 2]
            if long_mask is not None:
                long = self.inv_freq("long", device)  # [head_dim / 2]
                inv_freq = torch.where(long_mask[:, None], long, inv_freq)  # [B, head_dim / 2]
        else:
            inv_freq = self.inv_freq("base", device)  # [head_dim / 2]
        return self._rotate_tables(positions, inv_freq, dtype=dtype)

    def _rotate_tables(
        self, positions: torch.Tensor, inv_freq: torch.Tensor, *, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * inv_freq  # [T, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
        cos = emb.cos() * self.attention_factor  # [T, head_dim]
        sin = emb.sin() * self.attention_factor  # [T, head_dim]
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, d] and k [T, K, d] by cos/sin [T, d] (broadcast over heads)."""
    cos = cos[:, None, :]  # [T, 1, d]
    sin = sin[:, None, :]  # [T, 1, d]
    q_rot = q * cos + rotate_half(q) * sin  # [T, H, d]
    k_rot = k * cos + rotate_half(k) * sin  # [T, K, d]
    return q_rot, k_rot
