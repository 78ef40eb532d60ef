"""VisionDeployment as a plain class (no Ray): chunks of an oversized image encode to exactly the
rows of the whole image, and `check_health` runs a one-tile encode, cached for an interval.

`@serve.batch` itself runs only inside a replica; tests/test_serve_vision.py covers it end to end.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.vision import VisionDeployment, split_tiles
from internvl_core.config import ModelArchitecture
from internvl_core.preprocess.image import TilingConfig, tile_pixels
from internvl_core.serve_args import ServeArgs, VisionServeConfig
from tests import media_factory as mf

TINY_YAML_BATCH_TILES = 32  # serve_configs/tiny.yaml: vision.max_batch_tiles


def _deployment(path: Path, **vision: float) -> VisionDeployment:
    config = VisionServeConfig(max_batch_tiles=TINY_YAML_BATCH_TILES, **vision)  # type: ignore[arg-type]
    return VisionDeployment(ServeArgs(model_path=str(path), dtype="float32", vision=config))


def _tiles(path: Path, width: int, height: int, max_num: int) -> np.ndarray:
    """uint8 [T, S, S, 3] of a noise PNG, tiled as Preprocess does."""
    arch = ModelArchitecture.from_checkpoint(path)
    image = Image.open(io.BytesIO(mf.png_bytes(width, height, seed=width + height)))
    tiling = TilingConfig.from_architecture(arch, max_num=max_num)
    return np.concatenate(tile_pixels(image.convert("RGB"), tiling))


def test_split_tiles_keeps_order_and_bounds_every_chunk() -> None:
    tiles = np.arange(41).reshape(41, 1, 1, 1)  # [41, 1, 1, 1]: tile k holds k
    chunks = split_tiles(tiles, 32)
    assert [c.shape[0] for c in chunks] == [32, 9]
    assert np.array_equal(np.concatenate(chunks), tiles)
    assert all(np.shares_memory(c, tiles) for c in chunks)  # views: no copy of the pixels
    assert [c.shape[0] for c in split_tiles(tiles, 1)] == [1] * 41
    assert [c.shape[0] for c in split_tiles(tiles, 64)] == [41]
    assert split_tiles(tiles[:0], 4) == []
    with pytest.raises(ValueError, match="max_tiles is 0"):
        split_tiles(tiles, 0)


@pytest.mark.parametrize(("width", "height"), [(1600, 1000), (100, 1000)])
def test_chunked_image_rows_equal_whole_image_encode(
    tiny_qwen2: Path, width: int, height: int
) -> None:
    """The two requests of issue 11: 41 tiles at max_dynamic_patch 40, over tiny.yaml's 32."""
    deployment = _deployment(tiny_qwen2)
    tiles = _tiles(tiny_qwen2, width, height, max_num=40)  # [41, S, S, 3]
    assert tiles.shape[0] == 41 > deployment.config.max_batch_tiles
    encoder = deployment.encoder
    whole = encoder.encode(tiles, max_batch_tiles=64)  # [41, tokens, D]: one forward
    chunks = split_tiles(tiles, deployment.config.max_batch_tiles)
    chunked = torch.cat([encoder.encode(chunk) for chunk in chunks])  # [41, tokens, D]
    assert torch.equal(chunked, whole)  # bit for bit: greedy answers cannot differ


def test_check_health_encodes_one_tile(tiny_qwen2: Path) -> None:
    deployment = _deployment(tiny_qwen2, health_encode_interval_s=0)
    asyncio.run(deployment.check_health())
    assert asyncio.run(deployment.health()) is True
    with torch.no_grad():
        deployment.encoder.mlp1[1].weight.fill_(float("nan"))  # a corrupted device
    with pytest.raises(RuntimeError, match="non-finite embeddings"):
        asyncio.run(deployment.check_health())


def test_check_health_is_cached_for_its_interval(tiny_qwen2: Path) -> None:
    deployment = _deployment(tiny_qwen2, health_encode_interval_s=3600)
    asyncio.run(deployment.check_health())  # never encoded yet: probes
    probed_at = deployment.last_encode_ok
    assert probed_at > 0
    with torch.no_grad():
        deployment.encoder.mlp1[1].weight.fill_(float("nan"))
    asyncio.run(deployment.check_health())  # within the interval: no encode
    assert deployment.last_encode_ok == probed_at
