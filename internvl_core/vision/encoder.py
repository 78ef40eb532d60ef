"""VisionEncoder: pixel tiles -> LLM-width image embeddings (InternViT + pixel shuffle + mlp1).

`[n_tiles, 3, S, S]` pixels come in; `[n_tiles, num_image_token, D_llm]` embeddings come out, in
the order the original `extract_feature` produces them. Loads only `vision_model.*` and `mlp1.*`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from internvl_core.checkpoint import CheckpointReader, load_into_module
from internvl_core.config import ModelArchitecture
from internvl_core.errors import CheckpointError, InvalidRequestError
from internvl_core.preprocess.image import IMAGENET_MEAN, IMAGENET_STD
from internvl_core.vision.intern_vit import InternViT
from internvl_core.vision.projector import Projector, pixel_shuffle

logger = logging.getLogger(__name__)

_VISION_PREFIXES = ("vision_model.", "mlp1.")
_LAYER_KEY = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


def num_vit_layers_needed(select_layer: int, num_hidden_layers: int) -> int:
    """Layers to run so the last one's output is the original's `hidden_states[select_layer]`.

    `hidden_states` holds the embeddings then each layer's output (L + 1 entries).
    """
    total = num_hidden_layers
    if not -(total + 1) <= select_layer <= total:
        raise CheckpointError(
            f"select_layer is {select_layer}; must be in [{-(total + 1)}, {total}] for a ViT "
            f"with {total} layers"
        )
    return select_layer if select_layer >= 0 else total + 1 + select_layer


class VisionEncoder(nn.Module):
    """InternViT + pixel shuffle + mlp1, with parameter names equal to the checkpoint's keys."""

    def __init__(
        self,
        arch: ModelArchitecture,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.arch = arch
        side = arch.force_image_size // arch.vision.patch_size
        if not (side * arch.downsample_ratio).is_integer():
            raise CheckpointError(
                f"downsample_ratio {arch.downsample_ratio} does not divide the {side}x{side} "
                f"patch grid of force_image_size {arch.force_image_size}"
            )
        self.num_patches_per_side = side
        self.num_image_token = arch.num_image_token
        self.llm_hidden_size = arch.llm.hidden_size
        num_layers = num_vit_layers_needed(arch.select_layer, arch.vision.num_hidden_layers)
        with torch.device(device):
            self.vision_model = InternViT(arch.vision, num_layers=num_layers)
            self.mlp1 = Projector(
                arch.vision.hidden_size,
                arch.llm.hidden_size,
                downsample_ratio=arch.downsample_ratio,
            )
        self.to(dtype=dtype)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp1[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mlp1[1].weight.device

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        arch: ModelArchitecture | None = None,
    ) -> VisionEncoder:
        """Build from an original checkpoint folder, reading only the vision tensors.

        Modules are built on the meta device and materialised once, so a 6B ViT never exists in
        fp32 in memory. Fails with CheckpointError listing missing or unexpected keys.
        """
        arch = arch if arch is not None else ModelArchitecture.from_checkpoint(path)
        reader = CheckpointReader(path)
        encoder = cls(arch, dtype=dtype, device="meta")
        encoder.to_empty(device=device)
        encoder.load_checkpoint(reader)
        logger.info(
            "loaded vision encoder from %s: %d ViT layers, %s on %s",
            path,
            encoder.vision_model.num_layers,
            dtype,
            device,
        )
        return encoder

    def load_checkpoint(self, reader: CheckpointReader) -> None:
        """Copy `vision_model.*` and `mlp1.*` tensors in; layers past those built are skipped."""
        built = self.vision_model.num_layers
        total = self.arch.vision.num_hidden_layers

        def wanted(key: str) -> bool:
            if not key.startswith(_VISION_PREFIXES):
                return False
            match = _LAYER_KEY.match(key)
            # Layers after select_layer's output are never run; layers beyond the config's
            # count are kept so load_into_module reports them as unexpected.
            return match is None or not built <= int(match.group(1)) < total

        tensors = reader.load(wanted, dtype=self.dtype, device=self.device)
        load_into_module(self, tensors, context=f"vision encoder of {reader.path}")

    @torch.inference_mode()
    def forward(self, pixel_values: Tensor) -> Tensor:
        """[n_tiles, 3, S, S] (any float) -> [n_tiles, num_image_token, D_llm] in self.dtype."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)  # [n, 3, S, S]
        vit = self.vision_model(pixel_values)  # [n, 1 + side*side, C]
        num_tiles, _, hidden = vit.shape
        side = self.num_patches_per_side
        grid = vit[:, 1:, :].reshape(num_tiles, side, side, hidden)  # [n, side, side, C]
        grid = pixel_shuffle(grid, self.arch.downsample_ratio, self.arch.ps_version)
        # grid: [n, side*r, side*r, C/r^2] with r = downsample_ratio
        tokens = grid.reshape(num_tiles, -1, grid.shape[-1])  # [n, num_image_token, C/r^2]
        return self.mlp1(tokens)  # [n, num_image_token, D_llm]

    @torch.inference_mode()
    def encode(self, pixel_values: Tensor | np.ndarray, *, max_batch_tiles: int = 64) -> Tensor:
        """Encode any number of tiles (of one or many images) in chunks of `max_batch_tiles`.

        `pixel_values` is either normalised float tiles [n, 3, S, S] (the model card's
        `load_image`) or raw uint8 RGB tiles [n, S, S, 3] (what the Preprocess deployment sends:
        a quarter of the bytes), normalised here on the encoder's device, bit for bit as
        `load_image` does. Returns `[n_tiles, num_image_token, D_llm]` in input tile order.
        """
        if max_batch_tiles < 1:
            raise InvalidRequestError(
                f"max_batch_tiles is {max_batch_tiles}; must be at least 1", param="max_batch_tiles"
            )
        if isinstance(pixel_values, np.ndarray):
            pixel_values = torch.from_numpy(pixel_values)  # [n, 3, S, S] or uint8 [n, S, S, 3]
        raw = pixel_values.dtype == torch.uint8
        if raw:
            self._check_tiles(pixel_values)
        else:
            self._check_pixels(pixel_values)
        chunks = []
        for start in range(0, pixel_values.shape[0], max_batch_tiles):
            chunk = pixel_values[start : start + max_batch_tiles]
            if raw:
                chunk = normalize_tiles(chunk.to(self.device))  # [chunk, 3, S, S] float32
            chunks.append(self(chunk))  # [chunk, num_image_token, D_llm]
        if not chunks:
            return torch.empty(
                0, self.num_image_token, self.llm_hidden_size, dtype=self.dtype, device=self.device
            )  # [0, num_image_token, D_llm]
        return torch.cat(chunks)  # [n_tiles, num_image_token, D_llm]

    def _check_tiles(self, tiles: Tensor) -> None:
        size = self.arch.force_image_size
        channels = self.arch.vision.num_channels
        if tiles.dim() != 4 or tuple(tiles.shape[1:]) != (size, size, channels):
            raise InvalidRequestError(
                f"uint8 tiles have shape {tuple(tiles.shape)}; expected "
                f"[n_tiles, {size}, {size}, {channels}] (force_image_size {size})",
                param="pixel_values",
            )

    def _check_pixels(self, pixel_values: Tensor) -> None:
        size = self.arch.force_image_size
        channels = self.arch.vision.num_channels
        expected = (channels, size, size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise InvalidRequestError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                f"[n_tiles, {channels}, {size}, {size}] (force_image_size {size})",
                param="pixel_values",
            )
        if not pixel_values.is_floating_point():
            raise InvalidRequestError(
                f"pixel_values has dtype {pixel_values.dtype}; expected a float dtype",
                param="pixel_values",
            )


def normalize_tiles(tiles: Tensor) -> Tensor:
    """uint8 RGB tiles [n, S, S, 3] -> float32 [n, 3, S, S], on their device.

    torchvision's ToTensor + Normalize(ImageNet), as `preprocess.image.normalize_pixels`: float
    conversion, then true divisions and a subtraction in float32, each exactly rounded, so the
    values are identical on every device. The divisors are tensors on the tiles' device: CUDA
    turns division by a CPU scalar into multiplication by its reciprocal, which rounds
    differently.
    """
    device = tiles.device
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device)[:, None, None]
    scale = torch.full((1, 1, 1), 255.0, dtype=torch.float32, device=device)
    pixels = tiles.permute(0, 3, 1, 2).to(torch.float32)  # [n, 3, S, S]
    return (pixels / scale - mean) / std  # [n, 3, S, S]
