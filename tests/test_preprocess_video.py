"""Video frame sampling against a literal `get_index` and the original per-frame pipeline.

The clip is made in a fixture with PyAV (H.264, 30 frames of distinct colours, 64x48, 10 fps);
the reference reads frames one by one with decord and tiles them with the original steps.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import av
import decord
import numpy as np
import pytest
import torch
from PIL import Image

from internvl_core.errors import InvalidRequestError, MediaError
from internvl_core.preprocess.image import TilingConfig
from internvl_core.preprocess.video import VideoInfo, frame_indices, load_video, video_info

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_FRAMES, WIDTH, HEIGHT, FPS = 30, 64, 48, 10
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def encode_clip() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for k in range(NUM_FRAMES):
            pixels = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)  # [H, W, 3]
            pixels[:] = ((k * 37) % 256, (k * 91) % 256, (k * 53) % 256)
            pixels[: HEIGHT // 2, : WIDTH // 2] = 255 - pixels[0, 0]  # some structure to tile
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    path.write_bytes(encode_clip())
    return path


# ---- reference: the model card, step by step -------------------------------------------------


def ref_get_index(
    bound: tuple[float, float] | None, fps: float, max_frame: int, first_idx: int, num_segments: int
) -> np.ndarray:
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return np.array(
        [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]
    )


def ref_tiles(image: Image.Image, max_num: int, size: int) -> list[Image.Image]:
    ratios = set(
        (i, j)
        for n in range(1, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= 1
    )
    best_diff, best = float("inf"), (1, 1)
    for ratio in sorted(ratios, key=lambda x: x[0] * x[1]):
        diff = abs(image.width / image.height - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif (
            diff == best_diff
            and image.width * image.height > 0.5 * size * size * ratio[0] * ratio[1]
        ):
            best = ratio
    cols, rows = best
    resized = image.resize((size * cols, size * rows))
    tiles = [
        resized.crop(
            ((k % cols) * size, (k // cols) * size, (k % cols + 1) * size, (k // cols + 1) * size)
        )
        for k in range(cols * rows)
    ]
    if len(tiles) != 1:  # the card's load_video always passes use_thumbnail=True
        tiles.append(image.resize((size, size)))
    return tiles


def ref_transform(tile: Image.Image) -> torch.Tensor:
    raw = torch.from_numpy(np.array(tile, dtype=np.uint8, copy=True))  # [S, S, 3]
    tensor = raw.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # [3, S, S]
    mean = torch.as_tensor(MEAN, dtype=torch.float32).view(-1, 1, 1)  # [3, 1, 1]
    std = torch.as_tensor(STD, dtype=torch.float32).view(-1, 1, 1)  # [3, 1, 1]
    return tensor.sub(mean).div(std)  # [3, S, S]


def ref_load_video(
    path: Path, bound: tuple[float, float] | None, size: int, max_num: int, num_segments: int
) -> tuple[np.ndarray, list[int]]:
    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    max_frame = len(vr) - 1
    fps = float(vr.get_avg_fps())
    pixel_values_list, num_patches_list = [], []
    for frame_index in ref_get_index(bound, fps, max_frame, 0, num_segments):
        img = Image.fromarray(vr[frame_index].asnumpy()).convert("RGB")
        pixel_values = torch.stack([ref_transform(t) for t in ref_tiles(img, max_num, size)])
        num_patches_list.append(pixel_values.shape[0])
        pixel_values_list.append(pixel_values)  # [k, 3, S, S]
    return torch.cat(pixel_values_list).numpy(), num_patches_list  # [sum k, 3, S, S]


# ---- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bound", [None, (0.0, 1.0), (0.5, 2.0), (1.2, 1.9), (0.0, 100.0), (2.0, 1.0), (-5.0, 0.3)]
)
@pytest.mark.parametrize("num_segments", [1, 4, 7, 8, 32])
def test_frame_indices_match_get_index(
    bound: tuple[float, float] | None, num_segments: int
) -> None:
    for fps in (10.0, 25.0, 29.97, 59.94):
        for max_frame in (0, 29, 299, 1234):
            for first_idx in (0, 3):
                ours = frame_indices(
                    bound, fps, max_frame, first_idx=first_idx, num_segments=num_segments
                )
                ref = ref_get_index(bound, fps, max_frame, first_idx, num_segments)
                assert ours.dtype == np.int64
                assert np.array_equal(ours, ref), (bound, fps, max_frame, first_idx)


def test_frame_indices_known_values() -> None:
    # 30 frames, 8 segments: seg 29/8 = 3.625, int(1.8125 + round(3.625 k)); k=4 rounds 14.5 to
    # 14 (half to even), so the fifth index is 15, not 16.
    assert frame_indices(None, 10.0, 29, num_segments=8).tolist() == [1, 5, 8, 12, 15, 19, 23, 26]


def test_frame_indices_rejects_zero_segments() -> None:
    with pytest.raises(InvalidRequestError, match="num_segments is 0"):
        frame_indices(None, 10.0, 29, num_segments=0)


@pytest.mark.parametrize(
    ("bound", "max_num", "num_segments"),
    [(None, 1, 8), (None, 4, 8), ((0.5, 2.0), 4, 5), ((1.0, 1.5), 1, 16)],
)
def test_load_video_matches_original(
    clip: Path, bound: tuple[float, float] | None, max_num: int, num_segments: int
) -> None:
    cfg = TilingConfig(image_size=28, max_num=max_num, use_thumbnail=True)
    pixels, num_patches = load_video(clip, cfg=cfg, num_segments=num_segments, bound=bound)
    ref_pixels, ref_patches = ref_load_video(clip, bound, 28, max_num, num_segments)
    assert num_patches == ref_patches
    assert len(num_patches) == num_segments
    assert pixels.dtype == np.float32
    assert pixels.shape == ref_pixels.shape == (sum(num_patches), 3, 28, 28)
    assert np.array_equal(pixels, ref_pixels)


def test_frames_differ(clip: Path) -> None:
    """Guards against both sides reading the same wrong frame: sampled colours all differ."""
    pixels, _ = load_video(clip, cfg=TilingConfig(image_size=28, max_num=1), num_segments=8)
    corners = {tuple(np.round(pixels[k, :, -1, -1], 3)) for k in range(8)}
    assert len(corners) == 8


def test_model_card_default_one_tile_per_frame(clip: Path) -> None:
    pixels, num_patches = load_video(clip, cfg=TilingConfig(max_num=1), num_segments=8)
    assert num_patches == [1] * 8
    assert pixels.shape == (8, 3, 448, 448)


def test_sources_are_equivalent(clip: Path) -> None:
    cfg = TilingConfig(image_size=28, max_num=4)
    expected, patches = load_video(clip, cfg=cfg, num_segments=4)
    data = clip.read_bytes()
    for source in (str(clip), data, io.BytesIO(data)):
        got, got_patches = load_video(source, cfg=cfg, num_segments=4)
        assert got_patches == patches
        assert np.array_equal(got, expected)


def test_video_info(clip: Path) -> None:
    info = video_info(clip)
    assert info == VideoInfo(num_frames=30, fps=10.0, duration_s=3.0, width=64, height=48)
    assert video_info(clip.read_bytes()) == info


def test_corrupt_or_missing_video_raises_media_error(clip: Path, tmp_path: Path) -> None:
    data = clip.read_bytes()
    cfg = TilingConfig(image_size=28, max_num=1)
    for bad in (b"not a video at all", data[:200], b""):
        with pytest.raises(MediaError, match="video cannot be decoded"):
            load_video(bad, cfg=cfg)
    with pytest.raises(MediaError, match="not found"):
        video_info(tmp_path / "missing.mp4")


def test_bound_past_the_end_raises_media_error(clip: Path) -> None:
    with pytest.raises(MediaError, match=r"frames 0\.\.29") as info:
        load_video(clip, cfg=TilingConfig(image_size=28, max_num=1), bound=(5.0, 10.0))
    assert info.value.param == "bound"


def _encode(container_format: str, codec: str, pix_fmt: str = "yuv420p") -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        for k in range(12):
            pixels = np.full((HEIGHT, WIDTH, 3), (k * 20) % 256, dtype=np.uint8)  # [H, W, 3]
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("container_format", "codec"),
    # webm/VP8: test_webm_vp8_matches_original (encoded in a subprocess).
    [("avi", "mpeg4"), ("matroska", "libx264"), ("mp4", "mpeg4")],
)
def test_other_containers_match_original(tmp_path: Path, container_format: str, codec: str) -> None:
    path = tmp_path / f"clip.{container_format}"
    path.write_bytes(_encode(container_format, codec))
    cfg = TilingConfig(image_size=28, max_num=1, use_thumbnail=True)
    pixels, num_patches = load_video(path.read_bytes(), cfg=cfg, num_segments=4)
    ref_pixels, ref_patches = ref_load_video(path, None, 28, 1, 4)
    assert num_patches == ref_patches == [1, 1, 1, 1]
    assert np.array_equal(pixels, ref_pixels)


_WEBM_SCRIPT = """
import io, sys
import av, numpy as np
buf = io.BytesIO()
with av.open(buf, mode="w", format="webm") as container:
    stream = container.add_stream("libvpx", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for k in range(12):
        frame = np.full((48, 64, 3), (k * 20) % 256, dtype=np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
sys.stdout.buffer.write(buf.getvalue())
"""


def test_webm_vp8_matches_original(tmp_path: Path) -> None:
    # Encoded in a fresh process: PyAV's libvpx encoder can fail to open inside a long test run.
    webm = subprocess.run(
        [sys.executable, "-c", _WEBM_SCRIPT], check=True, capture_output=True, timeout=60
    ).stdout
    path = tmp_path / "clip.webm"
    path.write_bytes(webm)
    cfg = TilingConfig(image_size=28, max_num=1, use_thumbnail=True)
    pixels, num_patches = load_video(webm, cfg=cfg, num_segments=4)
    ref_pixels, ref_patches = ref_load_video(path, None, 28, 1, 4)
    assert num_patches == ref_patches == [1, 1, 1, 1]
    assert np.array_equal(pixels, ref_pixels)
