"""Dynamic image tiling + ImageNet normalisation, bit-exact with the model card `load_image`.

In: a path, bytes, file-like or PIL image and a `TilingConfig`. Out: float32 pixel tiles
`[num_tiles, 3, S, S]` (row-major grid tiles, then the thumbnail), as numpy.
"""

from __future__ import annotations

import functools
import io
import logging
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from internvl_core.config import ModelArchitecture
from internvl_core.errors import InvalidRequestError, MediaError, PayloadTooLargeError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Building the candidate set costs O(max_num^3); the original has no cap, 128 is far above any
# trained setting (12) and keeps a hostile max_num from stalling a worker.
MAX_NUM_LIMIT = 128

ImageSource = str | Path | bytes | bytearray | memoryview | BinaryIO | Image.Image

# Errors PIL raises for undecodable data (SyntaxError: e.g. "broken PNG file").
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error)


@dataclass(frozen=True, slots=True)
class TilingConfig:
    """How one image becomes tiles (`dynamic_preprocess` arguments of the original).

    Attributes:
        image_size: tile side S in pixels (`force_image_size`, 448).
        min_num: fewest grid tiles (`min_dynamic_patch`).
        max_num: most grid tiles, thumbnail not counted (`max_dynamic_patch`).
        use_thumbnail: append the whole image as one more tile when the grid has > 1 tile.
        dynamic: tile at all; False (InternVL-Chat-V1-2-Plus) = whole image as one S x S tile.
    """

    image_size: int = 448
    min_num: int = 1
    max_num: int = 12
    use_thumbnail: bool = True
    dynamic: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise InvalidRequestError(
                f"image_size is {self.image_size}; must be >= 1", param="image_size"
            )
        if self.min_num < 1:
            raise InvalidRequestError(f"min_num is {self.min_num}; must be >= 1", param="min_num")
        if not self.min_num <= self.max_num <= MAX_NUM_LIMIT:
            raise InvalidRequestError(
                f"max_num is {self.max_num}; must be in [min_num={self.min_num}, {MAX_NUM_LIMIT}]",
                param="max_num",
            )

    @classmethod
    def from_architecture(
        cls, arch: ModelArchitecture, *, max_num: int | None = None
    ) -> TilingConfig:
        """The checkpoint's own tiling (`config.json`), optionally with a per-request `max_num`."""
        return cls(
            image_size=arch.force_image_size,
            min_num=arch.min_dynamic_patch,
            max_num=arch.max_dynamic_patch if max_num is None else max_num,
            use_thumbnail=arch.use_thumbnail,
            dynamic=arch.dynamic_image_size,
        )


def open_image(source: ImageSource, *, apply_exif_orientation: bool = False) -> Image.Image:
    """Decode `source` as the original does: `Image.open(source).convert('RGB')` (first frame).

    The original ignores EXIF orientation; `apply_exif_orientation=True` rotates first.
    Raises MediaError for undecodable input, PayloadTooLargeError for a decompression bomb.
    """
    try:
        if isinstance(source, Image.Image):
            return _to_rgb(source, apply_exif_orientation)
        if isinstance(source, bytes | bytearray | memoryview):
            source = io.BytesIO(bytes(source))
        with Image.open(source) as image:
            return _to_rgb(image, apply_exif_orientation)
    except Image.DecompressionBombError as e:
        raise PayloadTooLargeError(
            f"image has too many pixels ({e}); limit is Image.MAX_IMAGE_PIXELS="
            f"{Image.MAX_IMAGE_PIXELS}",
            param="image",
        ) from e
    except FileNotFoundError as e:
        raise MediaError(f"image file {source!s} not found", param="image") from e
    except _DECODE_ERRORS as e:
        raise MediaError(f"image cannot be decoded: {e}", param="image") from e


def _to_rgb(image: Image.Image, apply_exif_orientation: bool) -> Image.Image:
    if apply_exif_orientation:
        image = ImageOps.exif_transpose(image)
    # convert() always returns a new image, detached from the open file; modes P, RGBA, LA, CMYK,
    # I;16, L, 1 all go through PIL's own converter exactly as in the original.
    return image.convert("RGB")


@lru_cache(maxsize=64)
def candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """Grids (cols, rows) in the original's order: sorted by tile count, set order within ties.

    The set is built with the same comprehension as `dynamic_preprocess`, so CPython iterates it
    in the same order (tuple hashes of small ints are not randomised); `sorted` is stable.
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    }
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise MediaError(f"image is {width}x{height}; both sides must be >= 1", param="image")


def find_grid(
    width: int, height: int, *, min_num: int, max_num: int, image_size: int
) -> tuple[int, int]:
    """(cols, rows) whose ratio is closest to width/height; on an exact tie the later grid wins
    when the image area exceeds half the grid's pixel area (`find_closest_aspect_ratio`)."""
    _check_size(width, height)
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def count_tiles(width: int, height: int, cfg: TilingConfig) -> int:
    """Tiles `tile_image` makes for a width x height image, without touching pixels."""
    _check_size(width, height)
    if not cfg.dynamic:
        return 1
    cols, rows = find_grid(
        width, height, min_num=cfg.min_num, max_num=cfg.max_num, image_size=cfg.image_size
    )
    num_blocks = cols * rows
    return num_blocks + 1 if cfg.use_thumbnail and num_blocks != 1 else num_blocks


def tile_image(image: Image.Image, cfg: TilingConfig) -> list[Image.Image]:
    """The original `dynamic_preprocess`: resize to the grid, crop row-major, maybe a thumbnail."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    size = cfg.image_size
    _check_size(image.width, image.height)
    if not cfg.dynamic:
        return [image.resize((size, size), Image.Resampling.BICUBIC)]
    cols, rows = find_grid(
        image.width, image.height, min_num=cfg.min_num, max_num=cfg.max_num, image_size=size
    )
    resized = image.resize((size * cols, size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
        for r in range(rows)
        for c in range(cols)
    ]
    # A single tile already is the whole image: a thumbnail would only duplicate it.
    if cfg.use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size), Image.Resampling.BICUBIC))
    return tiles


def _normalize_into(pixels: np.ndarray, out: np.ndarray) -> None:
    """pixels uint8 [k, S, S, 3] (any strides) -> out float32 [k, 3, S, S], in place.

    torchvision's ToTensor + Normalize are `x.float().div(255)` then `sub(mean).div(std)`, all
    in float32. The same three IEEE ops (true division, exactly rounded; never a multiplication
    by the reciprocal) give bit-identical values, over all tiles at once.
    """
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]  # [3, 1, 1]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]  # [3, 1, 1]
    np.copyto(out, pixels.transpose(0, 3, 1, 2), casting="unsafe")  # [k, 3, S, S]
    np.divide(out, np.float32(255), out=out)
    np.subtract(out, mean, out=out)
    np.divide(out, std, out=out)


def tile_pixels(image: Image.Image, cfg: TilingConfig) -> list[np.ndarray]:
    """`tile_image` as uint8 stacks [k, S, S, 3] (grid tiles, then the thumbnail), no crops.

    Slicing the resized grid is exactly what `crop` does, without one PIL image per tile.
    """
    size = cfg.image_size
    image = image if image.mode == "RGB" else image.convert("RGB")
    _check_size(image.width, image.height)
    if not cfg.dynamic:
        thumb = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))  # [S, S, 3]
        return [thumb[None]]  # [1, S, S, 3]
    cols, rows = find_grid(
        image.width, image.height, min_num=cfg.min_num, max_num=cfg.max_num, image_size=size
    )
    # The thumbnail resize runs beside the grid resize (PIL releases the GIL while resampling);
    # each is the same single PIL call as the original, so the pixels are identical.
    thumb_future = None
    if cfg.use_thumbnail and rows * cols != 1:
        thumb_future = _resize_pool().submit(image.resize, (size, size), Image.Resampling.BICUBIC)
    resized = image.resize((size * cols, size * rows), Image.Resampling.BICUBIC)
    grid = np.asarray(resized).reshape(rows, size, cols, size, 3)  # [rows, S, cols, S, 3]
    # Row-major tiles, same as cropping left->right, top->bottom.
    blocks = grid.transpose(0, 2, 1, 3, 4).reshape(rows * cols, size, size, 3)  # [n, S, S, 3]
    parts = [blocks]
    if thumb_future is not None:
        parts.append(np.asarray(thumb_future.result())[None])  # [1, S, S, 3]
    return parts


@functools.cache
def _resize_pool() -> ThreadPoolExecutor:
    """One small pool per process, created on first use (imports stay side-effect free)."""
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="thumbnail")


def normalize_pixels(parts: list[np.ndarray], size: int) -> np.ndarray:
    """uint8 tile stacks [k_i, S, S, 3] (e.g. from `tile_pixels`) -> float32 [sum k_i, 3, S, S]."""
    num_tiles = sum(part.shape[0] for part in parts)
    out = np.empty((num_tiles, 3, size, size), dtype=np.float32)  # [n, 3, S, S]
    start = 0
    for part in parts:
        _normalize_into(part, out[start : start + part.shape[0]])
        start += part.shape[0]
    return out


def normalize_tiles(tiles: list[Image.Image]) -> np.ndarray:
    """ToTensor + Normalize(ImageNet) of all tiles at once -> float32 [n, 3, S, S]."""
    if not tiles:
        raise InvalidRequestError("tiles is empty; need at least 1 tile", param="tiles")
    size = tiles[0].size
    if size[0] != size[1] or any(tile.size != size for tile in tiles):
        raise InvalidRequestError(
            f"tiles must all be square and of one size; got {sorted({t.size for t in tiles})}",
            param="tiles",
        )
    pixels = np.stack(
        [np.asarray(t if t.mode == "RGB" else t.convert("RGB")) for t in tiles]
    )  # [n, S, S, 3]
    return normalize_pixels([pixels], size[0])


def image_to_pixels(image: Image.Image, cfg: TilingConfig) -> np.ndarray:
    """An already-decoded image -> float32 [n, 3, S, S], equal to normalize_tiles(tile_image())."""
    return normalize_pixels(tile_pixels(image, cfg), cfg.image_size)


def load_image(
    source: ImageSource, cfg: TilingConfig, *, apply_exif_orientation: bool = False
) -> np.ndarray:
    """The model card's `load_image`: decode, tile, normalise -> float32 [n, 3, S, S]."""
    image = open_image(source, apply_exif_orientation=apply_exif_orientation)
    return image_to_pixels(image, cfg)
