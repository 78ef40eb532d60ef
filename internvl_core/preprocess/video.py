"""Video frame sampling with decord, bit-exact with the InternVL model card `load_video`.

In: a video path, bytes or file-like, a `TilingConfig` and a frame count. Out: float32 tiles
`[sum_tiles, 3, S, S]` of the sampled frames plus the tile count of each frame.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import decord
import numpy as np
from PIL import Image

from internvl_core.errors import InvalidRequestError, MediaError
from internvl_core.preprocess.image import TilingConfig, normalize_pixels, tile_pixels

logger = logging.getLogger(__name__)

VideoSource = str | Path | bytes | bytearray | memoryview | BinaryIO

# decord raises RuntimeError when it cannot open, DECORDError on decode failures and uses a bare
# `assert` for a zero frame count; all three mean "not a readable video" here.
_DECORD_ERRORS = (RuntimeError, decord.DECORDError, AssertionError, IndexError)


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """What the container reports: enough to check limits before decoding every frame."""

    num_frames: int
    fps: float
    duration_s: float
    width: int
    height: int


def frame_indices(
    bound: tuple[float, float] | None,
    fps: float,
    max_frame: int,
    *,
    first_idx: int = 0,
    num_segments: int = 32,
) -> np.ndarray:
    """The original `get_index`: the middle frame of each of `num_segments` equal segments.

    Args:
        bound: (start_s, end_s) to sample from; None = the whole video.
        fps: average frames per second (decord `get_avg_fps`).
        max_frame: last frame index (`len(video) - 1`).

    Returns:
        int64 [num_segments] frame indices (not range-checked, like the original).
    """
    if num_segments < 1:
        raise InvalidRequestError(
            f"num_segments is {num_segments}; must be >= 1", param="num_segments"
        )
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    # Same float64 ops in the same order as the per-index Python expression; astype truncates
    # toward zero like int().
    offsets = np.round(seg_size * np.arange(num_segments, dtype=np.float64))  # [num_segments]
    positions = start_idx + (seg_size / 2) + offsets  # [num_segments]
    return positions.astype(np.int64)  # [num_segments]


def _open_reader(source: VideoSource) -> decord.VideoReader:
    """decord reader exactly as the original opens it (cpu(0), one thread); MediaError if not."""
    if isinstance(source, bytes | bytearray | memoryview):
        uri: str | BinaryIO = io.BytesIO(bytes(source))
    elif isinstance(source, Path):
        uri = str(source)
    else:
        uri = source
    if isinstance(uri, str) and not Path(uri).is_file():
        raise MediaError(f"video file {uri} not found", param="video")
    try:
        return decord.VideoReader(uri, ctx=decord.cpu(0), num_threads=1)
    except _DECORD_ERRORS as e:
        raise MediaError(f"video cannot be decoded: {e}", param="video") from e


def _read_frame(reader: decord.VideoReader, index: int) -> np.ndarray:
    try:
        return reader[index].asnumpy()  # [H, W, 3] uint8
    except _DECORD_ERRORS as e:
        raise MediaError(f"video frame {index} cannot be decoded: {e}", param="video") from e


def video_info(source: VideoSource) -> VideoInfo:
    """Frame count, fps, duration and size; decodes only the first frame."""
    reader = _open_reader(source)
    num_frames = len(reader)
    fps = float(reader.get_avg_fps())
    height, width = _read_frame(reader, 0).shape[:2]
    duration_s = num_frames / fps if fps > 0 else 0.0
    return VideoInfo(
        num_frames=num_frames, fps=fps, duration_s=duration_s, width=width, height=height
    )


def load_video(
    source: VideoSource,
    *,
    cfg: TilingConfig,
    num_segments: int = 8,
    bound: tuple[float, float] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """The model card's `load_video`: sample frames, tile each, normalise all tiles at once.

    `cfg.max_num` is the tile budget per frame (the model card uses 1, with thumbnail on, which
    then never applies). Returns float32 [sum_tiles, 3, S, S] and the tile count per frame.
    """
    tiles, num_patches_list = load_video_tiles(
        source, cfg=cfg, num_segments=num_segments, bound=bound
    )
    return normalize_pixels([tiles], cfg.image_size), num_patches_list


def load_video_tiles(
    source: VideoSource,
    *,
    cfg: TilingConfig,
    num_segments: int = 8,
    bound: tuple[float, float] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """`load_video` before normalisation: uint8 [sum_tiles, S, S, 3] and tiles per frame."""
    reader = _open_reader(source)
    max_frame = len(reader) - 1
    fps = float(reader.get_avg_fps())
    indices = frame_indices(bound, fps, max_frame, first_idx=0, num_segments=num_segments)
    outside = indices[(indices < 0) | (indices > max_frame)]
    if outside.size:
        # The original raises IndexError past the end and silently wraps negative indices.
        raise MediaError(
            f"bound {bound} selects frames {outside.tolist()}; the video has frames "
            f"0..{max_frame} ({len(reader) / fps if fps > 0 else 0.0:.3f} s at {fps:.3f} fps)",
            param="bound",
        )
    parts: list[np.ndarray] = []
    num_patches_list: list[int] = []
    for index in indices.tolist():
        frame = Image.fromarray(_read_frame(reader, index)).convert("RGB")
        frame_parts = tile_pixels(frame, cfg)  # each [k, S, S, 3] uint8
        parts.extend(frame_parts)
        num_patches_list.append(sum(part.shape[0] for part in frame_parts))
    logger.debug(
        "sampled frames %s of %d, tiles %s", indices.tolist(), max_frame + 1, num_patches_list
    )
    size = cfg.image_size
    tiles = np.concatenate(parts) if parts else np.empty((0, size, size, 3), dtype=np.uint8)
    return tiles, num_patches_list  # [sum_tiles, S, S, 3] uint8
