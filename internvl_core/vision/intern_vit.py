"""InternViT encoder (300M LayerNorm layout and 6B RMSNorm + qk-norm layout).

Pixel tiles `[n, 3, S, S]` go in; the hidden state after the built layers, `[n, 1 + (S/p)^2, C]`,
comes out. Parameter names equal the original checkpoint names under `vision_model.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from internvl_core.config import VisionArchitecture
from internvl_core.errors import CheckpointError


class InternRMSNorm(nn.Module):
    """RMSNorm as InternViT computes it: normalise in fp32, cast back, then scale by the weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))  # [C]
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        input_dtype = x.dtype
        x_fp32 = x.to(torch.float32)  # [..., C]
        variance = x_fp32.pow(2).mean(-1, keepdim=True)  # [..., 1]
        normed = x_fp32 * torch.rsqrt(variance + self.eps)  # [..., C]
        return self.weight * normed.to(input_dtype)


def _make_norm(arch: VisionArchitecture) -> nn.Module:
    if arch.norm_type == "layer_norm":
        return nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
    return InternRMSNorm(arch.hidden_size, eps=arch.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    """Conv patch embedding, a CLS token, and position embeddings resized by bicubic resampling."""

    def __init__(self, arch: VisionArchitecture) -> None:
        super().__init__()
        hidden = arch.hidden_size
        self.num_positions_per_side = arch.num_patches_per_side
        num_positions = 1 + self.num_positions_per_side**2
        self.class_embedding = nn.Parameter(torch.randn(1, 1, hidden))  # [1, 1, C]
        self.patch_embedding = nn.Conv2d(
            arch.num_channels, hidden, kernel_size=arch.patch_size, stride=arch.patch_size
        )
        self.position_embedding = nn.Parameter(torch.randn(1, num_positions, hidden))  # [1, P, C]

    def _patch_positions(self, num_rows: int, num_cols: int) -> Tensor:
        """Patch position embeddings resized to the grid; always interpolated, as the original.

        Bicubic resizing to the trained grid is an exact identity, so this is a no-op at 448 px.
        """
        side = self.num_positions_per_side
        grid = self.position_embedding[:, 1:, :]  # [1, side*side, C]
        target_dtype = grid.dtype
        grid = grid.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, C, side, side]
        grid = F.interpolate(grid, size=(num_rows, num_cols), mode="bicubic", align_corners=False)
        # grid: [1, C, num_rows, num_cols]
        grid = grid.reshape(1, -1, num_rows * num_cols).permute(0, 2, 1)  # [1, rows*cols, C]
        return grid.to(target_dtype)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[n, 3, H, W] -> [n, 1 + (H/p)*(W/p), C]; CLS first, then patches row-major."""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # [n, C, rows, cols]
        batch_size, _, num_rows, num_cols = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # [n, rows*cols, C]
        cls = self.class_embedding.expand(batch_size, 1, -1).to(dtype)  # [n, 1, C]
        embeddings = torch.cat([cls, patches], dim=1)  # [n, 1 + rows*cols, C]
        positions = torch.cat(
            [self.position_embedding[:, :1, :], self._patch_positions(num_rows, num_cols)], dim=1
        )  # [1, 1 + rows*cols, C]
        return embeddings + positions.to(dtype)


class InternAttention(nn.Module):
    """Fused qkv projection, optional qk RMSNorm over all heads flattened, SDPA without a mask."""

    def __init__(self, arch: VisionArchitecture) -> None:
        super().__init__()
        hidden = arch.hidden_size
        self.num_heads = arch.num_attention_heads
        self.head_dim = arch.head_dim
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=arch.qkv_bias)
        # Identity has no parameters, so the 300M layout carries no q_norm/k_norm keys.
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        if arch.qk_normalization:
            self.q_norm = InternRMSNorm(hidden, eps=arch.layer_norm_eps)
            self.k_norm = InternRMSNorm(hidden, eps=arch.layer_norm_eps)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """[n, L, C] -> [n, L, C]."""
        batch_size, seq_len, hidden = x.shape
        qkv = self.qkv(x)  # [n, L, 3C]: rows q | k | v, heads contiguous inside each
        q, k, v = qkv.split(hidden, dim=-1)  # each [n, L, C]
        # qk-norm runs before the head split: its statistics span all heads.
        q = self.q_norm(q)  # [n, L, C]
        k = self.k_norm(k)  # [n, L, C]
        heads = (batch_size, seq_len, self.num_heads, self.head_dim)
        q = q.reshape(heads).transpose(1, 2)  # [n, num_heads, L, head_dim]
        k = k.reshape(heads).transpose(1, 2)  # [n, num_heads, L, head_dim]
        v = v.reshape(heads).transpose(1, 2)  # [n, num_heads, L, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        # out: [n, num_heads, L, head_dim]
        out = out.transpose(1, 2).reshape(batch_size, seq_len, hidden)  # [n, L, C]
        return self.proj(out)


class InternMLP(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, arch: VisionArchitecture) -> None:
        super().__init__()
        self.fc1 = nn.Linear(arch.hidden_size, arch.intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(arch.intermediate_size, arch.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionLayer(nn.Module):
    """Pre-norm block with layer scale: x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))."""

    def __init__(self, arch: VisionArchitecture) -> None:
        super().__init__()
        self.attn = InternAttention(arch)
        self.mlp = InternMLP(arch)
        self.norm1 = _make_norm(arch)
        self.norm2 = _make_norm(arch)
        self.ls1 = nn.Parameter(torch.ones(arch.hidden_size))  # [C]
        self.ls2 = nn.Parameter(torch.ones(arch.hidden_size))  # [C]

    def forward(self, x: Tensor) -> Tensor:
        """[n, L, C] -> [n, L, C]."""
        x = x + self.attn(self.norm1(x).to(x.dtype)) * self.ls1  # [n, L, C]
        return x + self.mlp(self.norm2(x).to(x.dtype)) * self.ls2  # [n, L, C]


class InternVisionEncoder(nn.Module):
    """The stack of layers (`encoder.layers.{i}`)."""

    def __init__(self, arch: VisionArchitecture, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InternVisionLayer(arch) for _ in range(num_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)  # [n, L, C]
        return x


class InternViT(nn.Module):
    """InternViT without a final norm; builds only the first `num_layers` layers.

    `num_layers=None` builds all of them (`select_layer=-1`); the original's `hidden_states[k]` is
    the output after k layers, so a model using `select_layer=s` needs `L + 1 + s` layers (s < 0).
    """

    def __init__(self, arch: VisionArchitecture, *, num_layers: int | None = None) -> None:
        super().__init__()
        total = arch.num_hidden_layers
        num_layers = total if num_layers is None else num_layers
        if not 0 <= num_layers <= total:
            raise CheckpointError(
                f"InternViT num_layers is {num_layers}; must be in [0, {total}] "
                f"(vision_config.num_hidden_layers)"
            )
        if arch.hidden_act != "gelu":
            raise CheckpointError(
                f"vision_config.hidden_act is {arch.hidden_act!r}; only 'gelu' is supported"
            )
        if arch.hidden_size % arch.num_attention_heads:
            raise CheckpointError(
                f"vision_config.hidden_size {arch.hidden_size} is not divisible by "
                f"num_attention_heads {arch.num_attention_heads}"
            )
        self.arch = arch
        self.num_layers = num_layers
        self.embeddings = InternVisionEmbeddings(arch)
        self.encoder = InternVisionEncoder(arch, num_layers)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[n, 3, S, S] -> [n, 1 + (S/p)^2, C]: the hidden state after the built layers."""
        hidden = self.embeddings(pixel_values)  # [n, 1 + (S/p)^2, C]
        return self.encoder(hidden)  # [n, 1 + (S/p)^2, C]
