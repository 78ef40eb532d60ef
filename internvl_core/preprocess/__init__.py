"""Media preprocessing bit-exact with the original InternVL: image tiling and video frames.

In: image/video sources and a `TilingConfig`. Out: float32 pixel tiles `[num_tiles, 3, S, S]`.
"""

from internvl_core.preprocess.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_NUM_LIMIT,
    TilingConfig,
    candidate_grids,
    count_tiles,
    find_grid,
    image_to_pixels,
    load_image,
    normalize_pixels,
    normalize_tiles,
    open_image,
    tile_image,
    tile_pixels,
)
from internvl_core.preprocess.video import VideoInfo, frame_indices, load_video, video_info

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_NUM_LIMIT",
    "TilingConfig",
    "VideoInfo",
    "candidate_grids",
    "count_tiles",
    "find_grid",
    "frame_indices",
    "image_to_pixels",
    "load_image",
    "load_video",
    "normalize_pixels",
    "normalize_tiles",
    "open_image",
    "tile_image",
    "tile_pixels",
    "video_info",
]
