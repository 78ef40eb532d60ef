"""DecoderModel: the Qwen2 / InternLM2 / Phi-3 / Llama-Yi decoder owning layers [start, end).

Hidden states [num_tokens, D] + positions + one paged KV cache per owned layer + AttentionMetadata
-> hidden states [num_tokens, D] (final norm applied on the last stage); logits: `compute_logits`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from internvl_core.checkpoint.reader import CheckpointReader, load_into_module
from internvl_core.config import LLMArchitecture, ModelArchitecture
from internvl_core.errors import CheckpointError
from internvl_core.model.attention import (
    AttentionPlan,
    choose_backend,
    paged_attention,
    plan_attention,
)
from internvl_core.model.attention_metadata import AttentionMetadata
from internvl_core.model.decode_attention import DecodeMetadata, decode_attention, write_decode_kv
from internvl_core.model.layers import GatedMLP, RMSNorm
from internvl_core.model.quantization import QUANTIZATION_MODES, quantize_layer
from internvl_core.model.rope import RotaryEmbedding, apply_rotary
from internvl_core.model.weights import (
    NORM_KEY,
    StageKeys,
    TensorRecipe,
    check_stage_keys,
    embedding_key,
    head_key,
    layer_recipes,
    load_recipes,
    o_proj_has_bias,
)

logger = logging.getLogger(__name__)


class SelfAttention(nn.Module):
    """Fused qkv projection -> RoPE -> paged attention -> output projection."""

    def __init__(self, arch: LLMArchitecture, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.head_dim
        self.scale = arch.head_dim**-0.5
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        q_rows = self.num_heads * self.head_dim
        self.qkv_proj = nn.Linear(
            arch.hidden_size, qkv_rows, bias=arch.attention_bias, dtype=dtype, device=device
        )
        self.o_proj = nn.Linear(
            q_rows, arch.hidden_size, bias=o_proj_has_bias(arch), dtype=dtype, device=device
        )

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        *,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        q, k, v = self._rotated_qkv(hidden, rope)
        out = paged_attention(q, k, v, kv_cache, attn, self.scale, plan=plan)  # [T, H, d]
        return self.o_proj(out.flatten(1))  # [T, D]

    def _rotated_qkv(
        self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, D] -> q [T, H, d], k [T, K, d] (both rotated), v [T, K, d]."""
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (H + 2K) * d]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, d]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, K, d]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, K, d]
        q, k = apply_rotary(q, k, *rope)
        return q, k, v

    def forward_decode(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: DecodeMetadata,
    ) -> torch.Tensor:
        """The traceable one-token-per-row variant of `forward`: hidden [B, D] -> [B, D]."""
        q, k, v = self._rotated_qkv(hidden, rope)  # [B, H, d], [B, K, d], [B, K, d]
        write_decode_kv(k, v, kv_cache, meta.slot_mapping)
        out = decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, self.scale)
        return self.o_proj(out.flatten(1))  # [B, D]


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, arch: LLMArchitecture, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        eps = arch.rms_norm_eps
        self.input_layernorm = RMSNorm(arch.hidden_size, eps, dtype=dtype, device=device)
        self.self_attn = SelfAttention(arch, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps, dtype=dtype, device=device)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, dtype=dtype, device=device)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        *,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(hidden), rope, kv_cache, attn, plan=plan)
        hidden = hidden + attended  # [T, D]
        return hidden + self.mlp(self.post_attention_layernorm(hidden))  # [T, D]

    def forward_decode(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: DecodeMetadata,
    ) -> torch.Tensor:
        attended = self.self_attn.forward_decode(
            self.input_layernorm(hidden), rope, kv_cache, meta
        )  # [B, D]
        hidden = hidden + attended  # [B, D]
        return hidden + self.mlp(self.post_attention_layernorm(hidden))  # [B, D]


class DecoderModel(nn.Module):
    """The decoder layers [start_layer, end_layer) of one pipeline stage.

    The first stage owns the token embedding, the last one the final norm and the LM head (shared
    with the embedding only when `tie_word_embeddings` is true and the stage owns both).
    With `materialize=False` parameters stay on the meta device until `load_checkpoint` fills them
    layer by layer (no full-precision copy of a stage that gets quantized).
    """

    def __init__(
        self,
        arch: LLMArchitecture,
        *,
        start_layer: int = 0,
        end_layer: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        materialize: bool = True,
    ) -> None:
        super().__init__()
        end_layer = arch.num_hidden_layers if end_layer is None else end_layer
        if not 0 <= start_layer < end_layer <= arch.num_hidden_layers:
            raise CheckpointError(
                f"layer range [{start_layer}, {end_layer}) must be non-empty and within "
                f"num_hidden_layers {arch.num_hidden_layers}"
            )
        self.arch = arch
        self.start_layer, self.end_layer = start_layer, end_layer
        self.num_layers = end_layer - start_layer
        self.is_first_stage = start_layer == 0
        self.is_last_stage = end_layer == arch.num_hidden_layers
        self.dtype = dtype
        self.device = torch.device(device)
        self.rope = RotaryEmbedding(arch)
        self._backends: dict[tuple[int, torch.dtype], str] = {}
        meta = torch.device("meta")
        vocab, width = arch.vocab_size, arch.hidden_size
        self.embedding: nn.Embedding | None = None
        self.norm: RMSNorm | None = None
        self.lm_head: nn.Linear | None = None
        if self.is_first_stage:
            self.embedding = nn.Embedding(vocab, width, dtype=dtype, device=meta)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, dtype=dtype, device=meta) for _ in range(self.num_layers)
        )
        if self.is_last_stage:
            self.norm = RMSNorm(width, arch.rms_norm_eps, dtype=dtype, device=meta)
            self.lm_head = nn.Linear(width, vocab, bias=False, dtype=dtype, device=meta)
        self._tie_head()
        if materialize and self.device.type != "meta":
            self.to_empty(device=self.device)
            self._tie_head()
            self._init_random()
        self.requires_grad_(False)  # inference only: no autograd graph even outside no_grad

    @property
    def shares_head(self) -> bool:
        """The head is the embedding matrix itself (tied, and this stage owns both)."""
        return self.arch.tie_word_embeddings and self.is_first_stage and self.is_last_stage

    def _tie_head(self) -> None:
        if self.shares_head:
            self.lm_head.weight = self.embedding.weight

    @torch.no_grad()
    def _init_random(self) -> None:
        """Small normal weights and unit norms, so an unloaded model computes finite values."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, 0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of one owned layer's cache: [2, num_blocks, block_size, K, d]."""
        return (2, num_blocks, block_size, self.arch.num_key_value_heads, self.arch.head_dim)

    def allocate_kv_caches(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        """Zeroed caches, one per owned layer, in the model dtype on the model device."""
        shape = self.kv_cache_shape(num_blocks, block_size)
        return [
            torch.zeros(shape, dtype=self.dtype, device=self.device)  # [2, N, B, K, d]
            for _ in range(self.num_layers)
        ]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: input_ids [T] -> [T, D] (first stage only)."""
        assert self.embedding is not None, "only the first stage owns the embedding"
        return self.embedding(input_ids)  # [T, D]

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Run the owned layers over a flattened batch.

        Args:
            hidden: [T, D] stage input (stage 0: embeddings with image embeddings spliced in).
            positions: [T] int64 position of each token in its sequence.
            kv_caches: one [2, num_blocks, block_size, K, d] cache per owned layer.
            attn: where new K/V go and what each sequence attends to.

        Returns:
            [T, D] hidden states; on the last stage after the final norm.
        """
        assert len(kv_caches) == self.num_layers, "one KV cache per owned layer"
        rope = self.rope.cos_sin(positions, attn, dtype=hidden.dtype)  # 2 x [T, d]
        plan = plan_attention(
            attn, hidden.device, backend=self.attention_backend(attn.block_size, hidden.dtype)
        )
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, rope, kv_cache, attn, plan=plan)  # [T, D]
        if self.norm is not None:
            hidden = self.norm(hidden)  # [T, D]
        return hidden

    def attention_backend(self, block_size: int, dtype: torch.dtype) -> str:
        """The attention backend for this stage's device, `dtype` and the cache's block size."""
        key = (block_size, dtype)
        if key not in self._backends:
            arch = self.arch
            heads = (arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim)
            self._backends[key] = choose_backend(
                self.device, dtype, block_size=block_size, heads=heads
            )
            logger.info(
                "attention backend %s (%s, block_size %d)", self._backends[key], dtype, block_size
            )
        return self._backends[key]

    def forward_decode(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: DecodeMetadata,
    ) -> torch.Tensor:
        """`forward` for a decode-only batch (one token per row), traceable with
        `torch.compile(fullgraph=True)`: no host reads, no Python branches on tensor values.
        Call `rope.prepare_decode(device)` once before tracing.

        Args:
            hidden: [B, D] stage input (stage 0: token embeddings).
            positions: [B] int64 position of each row's token.
            kv_caches: one [2, num_blocks, block_size, K, d] cache per owned layer.
            meta: slots, block tables and seq lens of the B rows.

        Returns:
            [B, D] hidden states; on the last stage after the final norm.
        """
        rope = self.rope.decode_cos_sin(positions, meta.long_rope_mask, dtype=hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer.forward_decode(hidden, rope, kv_cache, meta)  # [B, D]
        if self.norm is not None:
            hidden = self.norm(hidden)  # [B, D]
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, D] final hidden states -> [N, V] float32 logits (last stage only)."""
        assert self.lm_head is not None, "only the last stage owns the LM head"
        return self.lm_head(hidden).float()  # [N, V]

    def stage_keys(self) -> StageKeys:
        return StageKeys(self.start_layer, self.end_layer, self.is_first_stage, self.is_last_stage)

    @torch.no_grad()
    def load_checkpoint(
        self,
        reader: CheckpointReader,
        *,
        prefix: str = "language_model.",
        quantization: Literal["8bit", "4bit"] | None = None,
    ) -> None:
        """Load the owned tensors only, one layer at a time; optionally quantize the layer linears.

        Raises CheckpointError listing missing and unexpected keys before reading any tensor.
        """
        if quantization is not None and quantization not in QUANTIZATION_MODES:
            raise CheckpointError(
                f"quantization is {quantization!r}; supported: {QUANTIZATION_MODES} or None"
            )
        arch = self.arch
        check_stage_keys(reader.keys(), arch, self.stage_keys(), prefix=prefix)
        self._load_edges(reader, prefix)
        # bitsandbytes quantizes while moving CPU weights to the device: stage them on the CPU.
        staging = torch.device("cpu") if quantization is not None else self.device
        for offset, layer in enumerate(self.layers):
            idx = self.start_layer + offset
            tensors = load_recipes(
                reader,
                layer_recipes(arch, idx),
                arch,
                prefix=prefix,
                dtype=self.dtype,
                device=staging,
            )
            layer.to_empty(device=staging)
            load_into_module(layer, tensors, context=f"{prefix}model.layers.{idx}")
            if quantization is not None:
                quantize_layer(layer, quantization, device=self.device, compute_dtype=self.dtype)
                layer.input_layernorm.to(self.device)
                layer.post_attention_layernorm.to(self.device)
        logger.info(
            "loaded %s layers [%d, %d) from %s%s",
            arch.family,
            self.start_layer,
            self.end_layer,
            reader.path,
            f" ({quantization})" if quantization else "",
        )

    def _load_edges(self, reader: CheckpointReader, prefix: str) -> None:
        """Embedding (first stage), final norm and head (last stage)."""
        arch = self.arch
        parts: list[tuple[nn.Module, str]] = []
        if self.embedding is not None:
            parts.append((self.embedding, embedding_key(arch)))
        if self.norm is not None:
            parts.append((self.norm, NORM_KEY))
        if self.lm_head is not None and not self.shares_head:
            parts.append(
                (self.lm_head, embedding_key(arch) if arch.tie_word_embeddings else head_key(arch))
            )
        for module, key in parts:
            recipe = {"weight": TensorRecipe((key,))}
            tensors = load_recipes(
                reader, recipe, arch, prefix=prefix, dtype=self.dtype, device=self.device
            )
            module.to_empty(device=self.device)
            load_into_module(module, tensors, context=prefix + key)
        self._tie_head()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        start_layer: int = 0,
        end_layer: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        quantization: Literal["8bit", "4bit"] | None = None,
        arch: LLMArchitecture | None = None,
    ) -> DecoderModel:
        """Build the stage from an original InternVL checkpoint folder (config.json + weights)."""
        if arch is None:
            arch = ModelArchitecture.from_checkpoint(path).llm
        model = cls(
            arch,
            start_layer=start_layer,
            end_layer=end_layer,
            dtype=dtype,
            device=device,
            materialize=False,
        )
        model.load_checkpoint(CheckpointReader(path), quantization=quantization)
        return model.eval()
