"""Pixel shuffle (v1 / v2 token order) and the `mlp1` projector from ViT width to LLM width.

`pixel_shuffle` folds 2x2 patch neighbourhoods into channels: `[n, h, w, C] -> [n, h/2, w/2, 4C]`;
`Projector` maps `[..., 4C] -> [..., D_llm]`; its parameters load from `mlp1.{0,1,3}.*` keys.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from internvl_core.errors import InternVLError

PixelShuffleVersion = Literal["v1", "v2"]


def pixel_shuffle(x: Tensor, scale: float, version: PixelShuffleVersion) -> Tensor:
    """Downsample a patch grid into channels with the original's exact view/permute sequence.

    For scale 0.5, output token (i, j) holds `[x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1)]`.
    `v2` returns `[n, h*scale, w*scale, C/scale^2]` (tokens row-major once flattened); `v1` skips
    the final swap, so its grid is transposed (`[n, w*scale, h*scale, ...]`, tokens column-major),
    which is what V1.2-era checkpoints were trained with.

    Args:
        x: `[n, h, w, C]` with dim 1 the patch rows and dim 2 the patch columns.
        scale: the downsample ratio (`downsample_ratio`, 0.5 for every InternVL2 model).
        version: `ps_version` of the checkpoint.
    """
    batch_size, num_rows, num_cols, channels = x.shape
    rows_out, cols_out = num_rows * scale, num_cols * scale
    channels_out = channels / (scale * scale)
    if not (rows_out.is_integer() and cols_out.is_integer() and channels_out.is_integer()):
        raise InternVLError(
            f"pixel_shuffle input grid {num_rows}x{num_cols} with {channels} channels is not "
            f"divisible by downsample_ratio {scale}"
        )
    # Merge column pairs into channels.
    x = x.reshape(batch_size, num_rows, int(cols_out), int(channels / scale))
    # x: [n, h, w*scale, C/scale]
    x = x.permute(0, 2, 1, 3).contiguous()  # [n, w*scale, h, C/scale]
    # Merge row pairs into channels; the grid is now (column pair, row pair).
    x = x.view(batch_size, int(cols_out), int(rows_out), int(channels_out))
    # x: [n, w*scale, h*scale, C/scale^2]
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()  # [n, h*scale, w*scale, C/scale^2]
    return x


class Projector(nn.Sequential):
    """`mlp1`: LayerNorm(4C, eps 1e-5) -> Linear(4C, D) -> exact GELU -> Linear(D, D).

    Children are named `0`, `1`, `2`, `3` as in the original `nn.Sequential`, so `mlp1.*` keys load
    by stripping the prefix (the GELU at `2` has no parameters).
    """

    def __init__(
        self, vit_hidden_size: int, llm_hidden_size: int, *, downsample_ratio: float
    ) -> None:
        # The original sizes the input by int(1 / ratio)^2, not 1 / ratio^2.
        in_features = vit_hidden_size * int(1 / downsample_ratio) ** 2
        super().__init__(
            nn.LayerNorm(in_features),
            nn.Linear(in_features, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        )
        self.in_features = in_features
        self.llm_hidden_size = llm_hidden_size
