"""Image preprocessing speed: our numpy `load_image` vs the original PIL + per-tile torch pipeline.

Both start from the same decoded RGB image (synthetic noise), so decoding is not measured; prints
one JSON line: tiles/s and median seconds per image for each side, the speedup, equality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from internvl_core.preprocess.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TilingConfig,
    load_image,
    normalize_pixels,
    tile_image,
    tile_pixels,
)


def original_load_image(image: Image.Image, size: int, max_num: int) -> torch.Tensor:
    """The model card's `load_image` after `Image.open`: dynamic_preprocess + T.Compose per tile."""
    image = image.convert("RGB")
    ratios = set(
        (i, j)
        for n in range(1, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= 1
    )
    best_diff, best = float("inf"), (1, 1)
    area = image.width * image.height
    for ratio in sorted(ratios, key=lambda x: x[0] * x[1]):
        diff = abs(image.width / image.height - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * size * size * ratio[0] * ratio[1]:
            best = ratio
    cols, rows = best
    resized = image.resize((size * cols, size * rows))
    tiles = [
        resized.crop(
            ((k % cols) * size, (k // cols) * size, (k % cols + 1) * size, (k // cols + 1) * size)
        )
        for k in range(cols * rows)
    ]
    if len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    return original_transform(tiles)


def original_transform(tiles: list[Image.Image]) -> torch.Tensor:
    """Per tile: T.ToTensor() then T.Normalize(mean, std) (which clones, then sub_ / div_)."""
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)  # [3, 1, 1]
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)  # [3, 1, 1]
    pixel_values = []
    for tile in tiles:
        raw = torch.from_numpy(np.array(tile, dtype=np.uint8, copy=True))  # [S, S, 3]
        tensor = raw.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # [3, S, S]
        pixel_values.append(tensor.clone().sub_(mean).div_(std))  # [3, S, S]
    return torch.stack(pixel_values)  # [n, 3, S, S]


def median_seconds(
    ours: Callable[[], object], original: Callable[[], object], iters: int
) -> tuple[float, float]:
    """Median seconds per call of each; calls alternate so load from other processes hits both."""
    ours(), original()  # warm-up (caches, allocator)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(iters):
        for fn, bucket in ((ours, times[0]), (original, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def device_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    name = names[0] if names else platform.processor() or "unknown"
    return f"cpu: {name}, {len(os.sched_getaffinity(0))} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--max-num", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8)  # [H, W, 3]
    image = Image.fromarray(pixels)
    cfg = TilingConfig(image_size=args.image_size, max_num=args.max_num, use_thumbnail=True)

    ours = load_image(image, cfg)
    ref = original_load_image(image, args.image_size, args.max_num).numpy()
    ours_s, original_s = median_seconds(
        lambda: load_image(image, cfg),
        lambda: original_load_image(image, args.image_size, args.max_num),
        args.iters,
    )
    # Normalisation alone (ours over all tiles at once vs the per-tile torch ops).
    tiles = tile_image(image, cfg)
    parts = tile_pixels(image, cfg)
    ours_norm_s, original_norm_s = median_seconds(
        lambda: normalize_pixels(parts, args.image_size),
        lambda: original_transform(tiles),
        args.iters,
    )
    result = {
        "width": args.width,
        "height": args.height,
        "max_num": args.max_num,
        "num_tiles": int(ours.shape[0]),
        "iters": args.iters,
        "torch_threads": args.threads,
        "ours_tiles_s": round(ours.shape[0] / ours_s, 1),
        "original_tiles_s": round(ours.shape[0] / original_s, 1),
        "ours_s_per_image": round(ours_s, 5),
        "original_s_per_image": round(original_s, 5),
        "speedup": round(original_s / ours_s, 3),
        "ours_normalize_s": round(ours_norm_s, 5),
        "original_normalize_s": round(original_norm_s, 5),
        "identical": bool(ours.shape == ref.shape and np.array_equal(ours, ref)),
        "device": device_name(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
