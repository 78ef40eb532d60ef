"""Image tiling + normalisation against an independent re-statement of the original pipeline.

The reference below follows the model card step by step (set of grids, PIL default resize, crops,
thumbnail, ToTensor/Normalize as explicit float32 torch ops); results must be identical.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from internvl_core.config import ModelArchitecture
from internvl_core.errors import InvalidRequestError, MediaError, PayloadTooLargeError
from internvl_core.preprocess.image import (
    MAX_NUM_LIMIT,
    TilingConfig,
    candidate_grids,
    count_tiles,
    find_grid,
    load_image,
    normalize_tiles,
    open_image,
    tile_image,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ---- reference: the original steps, one by one ---------------------------------------------


def ref_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(ratios, key=lambda x: x[0] * x[1])


def ref_closest(width: int, height: int, ratios: list[tuple[int, int]], size: int) -> tuple:
    aspect_ratio = width / height
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * size * size * ratio[0] * ratio[1]:
            best = ratio
    return best


def ref_dynamic_preprocess(
    image: Image.Image, min_num: int, max_num: int, size: int, use_thumbnail: bool
) -> list[Image.Image]:
    cols, rows = ref_closest(image.width, image.height, ref_grids(min_num, max_num), size)
    resized = image.resize((size * cols, size * rows))  # PIL default resample
    tiles = []
    for k in range(cols * rows):
        box = ((k % cols) * size, (k // cols) * size, (k % cols + 1) * size, (k // cols + 1) * size)
        tiles.append(resized.crop(box))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    return tiles


def ref_transform(tile: Image.Image, size: int) -> torch.Tensor:
    tile = tile if tile.mode == "RGB" else tile.convert("RGB")
    if tile.size != (size, size):  # T.Resize((S, S), BICUBIC); a no-op for S x S tiles
        tile = tile.resize((size, size), Image.Resampling.BICUBIC)
    raw = torch.from_numpy(np.array(tile, dtype=np.uint8, copy=True))  # [S, S, 3]
    tensor = raw.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # [3, S, S]
    mean = torch.as_tensor(MEAN, dtype=torch.float32).view(-1, 1, 1)  # [3, 1, 1]
    std = torch.as_tensor(STD, dtype=torch.float32).view(-1, 1, 1)  # [3, 1, 1]
    return tensor.sub(mean).div(std)  # [3, S, S]


def ref_load(image: Image.Image, cfg: TilingConfig) -> np.ndarray:
    image = image.convert("RGB")
    if cfg.dynamic:
        tiles = ref_dynamic_preprocess(
            image, cfg.min_num, cfg.max_num, cfg.image_size, cfg.use_thumbnail
        )
    else:
        tiles = [image]
    return torch.stack([ref_transform(t, cfg.image_size) for t in tiles]).numpy()  # [n, 3, S, S]


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)  # [H, W, 3]
    return Image.fromarray(pixels)


def assert_matches_original(image: Image.Image, cfg: TilingConfig) -> np.ndarray:
    ours = load_image(image, cfg)
    ref = ref_load(image, cfg)
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    assert count_tiles(image.width, image.height, cfg) == ours.shape[0]
    assert len(tile_image(image.convert("RGB"), cfg)) == ours.shape[0]
    return ours


# ---- grids -----------------------------------------------------------------------------------


def test_candidate_order_for_max_12_matches_spec() -> None:
    head = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5)]
    head += [(1, 6), (6, 1), (3, 2), (2, 3)]
    assert list(candidate_grids(1, 12)[: len(head)]) == head


@pytest.mark.parametrize("min_num", [1, 2, 3])
def test_candidate_grids_match_original_order(min_num: int) -> None:
    for max_num in range(min_num, 41):
        assert list(candidate_grids(min_num, max_num)) == ref_grids(min_num, max_num)


@pytest.mark.parametrize("max_num", range(1, 41))
def test_find_grid_and_count_match_original(max_num: int) -> None:
    sizes = [(w, h) for w in (1, 3, 56, 97, 448, 500, 1000, 1920, 5000) for h in (1, 2, 300, 1080)]
    for width, height in sizes:
        grid = find_grid(width, height, min_num=1, max_num=max_num, image_size=448)
        assert grid == ref_closest(width, height, ref_grids(1, max_num), 448)
        for thumb in (True, False):
            cfg = TilingConfig(max_num=max_num, use_thumbnail=thumb)
            blocks = grid[0] * grid[1]
            expected = blocks + 1 if thumb and blocks > 1 else blocks
            assert count_tiles(width, height, cfg) == expected


@pytest.mark.parametrize(
    ("width", "height", "max_num", "grid", "num_tiles"),
    [
        (1920, 1080, 12, (4, 2), 9),  # ties 2:1 with (2,1) and wins (area rule)
        (448, 448, 12, (1, 1), 1),
        (500, 500, 12, (1, 1), 1),  # too small to move to (2,2)
        (1000, 1000, 12, (3, 3), 10),  # tie rule walks (1,1) -> (2,2) -> (3,3)
        (800, 600, 6, (3, 2), 7),
        (600, 800, 6, (2, 3), 7),
        (5000, 300, 12, (12, 1), 13),
        (3, 500, 12, (1, 12), 13),
    ],
)
def test_explicit_grids(
    width: int, height: int, max_num: int, grid: tuple[int, int], num_tiles: int
) -> None:
    assert find_grid(width, height, min_num=1, max_num=max_num, image_size=448) == grid
    assert count_tiles(width, height, TilingConfig(max_num=max_num)) == num_tiles


# ---- pixels ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio", [(1, 6), (1, 3), (1, 2), (2, 3), (1, 1), (3, 2), (2, 1), (3, 1), (6, 1)]
)
@pytest.mark.parametrize("max_num", [1, 6, 12])
@pytest.mark.parametrize("use_thumbnail", [True, False])
def test_aspect_ratios_match_original(
    ratio: tuple[int, int], max_num: int, use_thumbnail: bool
) -> None:
    image = noise_image(37 * ratio[0] + 5, 37 * ratio[1] + 3, seed=ratio[0] * 7 + ratio[1])
    cfg = TilingConfig(image_size=56, max_num=max_num, use_thumbnail=use_thumbnail)
    assert_matches_original(image, cfg)


@pytest.mark.parametrize("size", [(1, 1), (2, 1), (3, 500), (500, 3), (5000, 300), (300, 5000)])
def test_tiny_and_huge_images_match_original(size: tuple[int, int]) -> None:
    assert_matches_original(noise_image(*size), TilingConfig(image_size=56, max_num=12))


def test_every_max_num_up_to_40_matches_original() -> None:
    image = noise_image(250, 90, seed=3)
    for max_num in range(1, 41):
        assert_matches_original(image, TilingConfig(image_size=28, max_num=max_num))


@pytest.mark.parametrize("min_num", [2, 4])
def test_min_num_matches_original(min_num: int) -> None:
    assert_matches_original(noise_image(90, 90), TilingConfig(image_size=28, min_num=min_num))


@pytest.mark.parametrize("size", [(1, 1), (56, 56), (200, 40), (40, 300)])
def test_dynamic_off_is_one_resized_tile(size: tuple[int, int]) -> None:
    cfg = TilingConfig(image_size=56, dynamic=False, use_thumbnail=True)
    out = assert_matches_original(noise_image(*size), cfg)
    assert out.shape == (1, 3, 56, 56)


def test_full_size_448_matches_original() -> None:
    image = noise_image(1920, 1080, seed=11)
    out = assert_matches_original(image, TilingConfig(max_num=12))
    assert out.shape == (9, 3, 448, 448)
    plus = assert_matches_original(image, TilingConfig(dynamic=False, use_thumbnail=False))
    assert plus.shape == (1, 3, 448, 448)


def test_tile_image_crops_row_major() -> None:
    image = noise_image(120, 60)
    cfg = TilingConfig(image_size=28, max_num=8)
    tiles = tile_image(image, cfg)
    ref = ref_dynamic_preprocess(image, 1, 8, 28, True)
    assert [np.asarray(t).tobytes() for t in tiles] == [np.asarray(t).tobytes() for t in ref]


def test_normalize_tiles_equals_torch_ops_for_every_byte() -> None:
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)  # [16, 16]
    tiles = [
        Image.fromarray(np.stack([ramp, ramp.T, 255 - ramp], axis=-1)),  # [16, 16, 3]
        noise_image(16, 16, seed=5),
    ]
    ours = normalize_tiles(tiles)
    ref = torch.stack([ref_transform(t, 16) for t in tiles]).numpy()  # [2, 3, 16, 16]
    assert ours.shape == (2, 3, 16, 16)
    assert np.array_equal(ours, ref)
    torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(ref), rtol=0, atol=0)


def test_normalize_tiles_rejects_mixed_sizes() -> None:
    with pytest.raises(InvalidRequestError, match="tiles"):
        normalize_tiles([noise_image(8, 8), noise_image(9, 9)])
    with pytest.raises(InvalidRequestError, match="tiles is empty"):
        normalize_tiles([])


# ---- decoding --------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def mode_image(mode: str) -> Image.Image:
    rng = np.random.default_rng(7)
    base = noise_image(70, 50, seed=7)
    if mode == "P":
        return base.quantize(colors=32)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 2**16, size=(50, 70), dtype=np.uint16))
    if mode == "RGBA":
        rgba = np.concatenate([np.asarray(base), rng.integers(0, 256, (50, 70, 1), np.uint8)], -1)
        return Image.fromarray(rgba)  # [50, 70, 4]
    return base.convert(mode)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("L", "PNG"),
        ("1", "PNG"),
        ("I;16", "PNG"),
        ("CMYK", "TIFF"),
        ("CMYK", "JPEG"),
        ("RGB", "JPEG"),
    ],
)
def test_modes_convert_like_original(mode: str, fmt: str) -> None:
    data = encode(mode_image(mode), fmt)
    expected = Image.open(io.BytesIO(data)).convert("RGB")
    opened = open_image(data)
    assert opened.mode == "RGB"
    assert np.array_equal(np.asarray(opened), np.asarray(expected))
    cfg = TilingConfig(image_size=28, max_num=6)
    assert np.array_equal(load_image(data, cfg), ref_load(expected, cfg))


def test_pil_input_in_other_mode_is_converted() -> None:
    image = mode_image("P")
    assert np.array_equal(np.asarray(open_image(image)), np.asarray(image.convert("RGB")))


def test_all_source_kinds_give_identical_tiles(tmp_path: Path) -> None:
    image = noise_image(90, 60, seed=2)
    data = encode(image, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    cfg = TilingConfig(image_size=28, max_num=6)
    expected = load_image(image, cfg)
    for source in (path, str(path), data, bytearray(data), io.BytesIO(data)):
        assert np.array_equal(load_image(source, cfg), expected)


def test_exif_orientation_ignored_by_default() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(noise_image(80, 40), "JPEG", exif=exif)
    assert open_image(data).size == (80, 40)
    rotated = open_image(data, apply_exif_orientation=True)
    assert rotated.size == (40, 80)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(rotated), np.asarray(expected))


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (20, 10), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    opened = open_image(data)
    expected = Image.open(io.BytesIO(data)).convert("RGB")
    assert np.array_equal(np.asarray(opened), np.asarray(expected))
    assert tuple(np.asarray(opened)[0, 0]) == (255, 0, 0)


# ---- errors and config -----------------------------------------------------------------------


def test_undecodable_inputs_raise_media_error(tmp_path: Path) -> None:
    png = encode(noise_image(64, 64), "PNG")
    for bad in (b"not an image", png[: len(png) // 2], b""):
        with pytest.raises(MediaError, match="image"):
            open_image(bad)
    with pytest.raises(MediaError, match="not found"):
        open_image(tmp_path / "missing.png")


def test_decompression_bomb_is_payload_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noise_image(40, 40), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(PayloadTooLargeError, match="MAX_IMAGE_PIXELS"):
        open_image(data)


@pytest.mark.parametrize("dynamic", [True, False])
def test_empty_image_is_rejected(dynamic: bool) -> None:
    cfg = TilingConfig(image_size=28, dynamic=dynamic)
    with pytest.raises(MediaError, match="0x5"):
        count_tiles(0, 5, cfg)
    with pytest.raises(MediaError, match="0x5"):
        load_image(Image.new("RGB", (0, 5)), cfg)
    with pytest.raises(MediaError, match="0x5"):
        tile_image(Image.new("RGB", (0, 5)), cfg)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_num": 0}, "max_num"),
        ({"min_num": 3, "max_num": 2}, "max_num"),
        ({"max_num": MAX_NUM_LIMIT + 1}, "max_num"),
        ({"min_num": 0}, "min_num"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_config_limits(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field) as info:
        TilingConfig(**kwargs)
    assert info.value.param == field


def arch(**top: object) -> ModelArchitecture:
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision |= {"intermediate_size": 64, "image_size": 56, "patch_size": 14}
    vision |= {"norm_type": "layer_norm", "qkv_bias": True, "qk_normalization": False}
    llm = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2}
    llm |= {"num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512}
    return ModelArchitecture.from_dict({"vision_config": vision, "llm_config": llm, **top})


def test_from_architecture() -> None:
    internvl2 = arch(
        force_image_size=56,
        dynamic_image_size=True,
        use_thumbnail=True,
        max_dynamic_patch=12,
        ps_version="v2",
    )
    assert TilingConfig.from_architecture(internvl2) == TilingConfig(image_size=56, max_num=12)
    assert TilingConfig.from_architecture(internvl2, max_num=3).max_num == 3
    plus = TilingConfig.from_architecture(arch(dynamic_image_size=False, use_thumbnail=False))
    assert (plus.dynamic, plus.use_thumbnail, plus.image_size) == (False, False, 56)
