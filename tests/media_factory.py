"""Deterministic, small test media: PNG/JPEG/GIF and other PIL formats, hand-made PNG bombs,
zip files, H.264 clips (short, or with frames hours apart) and data: URLs of any of them.
"""

from __future__ import annotations

import base64
import fractions
import io
import struct
import zipfile
import zlib
from collections.abc import Sequence
from functools import lru_cache

import av
import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Color = tuple[int, int, int]


def random_pixels(width: int, height: int, *, seed: int = 0) -> np.ndarray:
    """Seeded noise, uint8 [height, width, 3]."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)  # [H, W, 3]


def encode_image(image: Image.Image, fmt: str, **params: object) -> bytes:
    """`image` saved by PIL in format `fmt` (PNG, JPEG, ICO, PPM, TGA, ...)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def png_bytes(width: int, height: int, *, seed: int = 0) -> bytes:
    """A valid RGB PNG of seeded noise."""
    return encode_image(Image.fromarray(random_pixels(width, height, seed=seed)), "PNG")


def jpeg_bytes(width: int, height: int, *, seed: int = 0) -> bytes:
    """A valid baseline JPEG of seeded noise."""
    return encode_image(Image.fromarray(random_pixels(width, height, seed=seed)), "JPEG")


def solid_image(width: int, height: int, color: Color, *, fmt: str) -> bytes:
    """One flat colour, in any format PIL writes."""
    return encode_image(Image.new("RGB", (width, height), color), fmt)


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    """The first `fraction` of the bytes (a download cut short)."""
    return data[: max(1, int(len(data) * fraction))]


def corrupted(data: bytes, *, seed: int, start: int, num_bytes: int = 200) -> bytes:
    """`num_bytes` random bytes overwritten at seeded positions at or after `start`."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    positions = rng.integers(start, len(out), num_bytes)  # [num_bytes]
    values = rng.integers(0, 256, num_bytes)  # [num_bytes]
    for position, value in zip(positions.tolist(), values.tolist(), strict=True):
        out[position] = value
    return bytes(out)


def zip_bytes(name: str = "image.png", payload: bytes = b"not an image " * 64) -> bytes:
    """A real zip archive (what a 'zip pretending to be a PNG' carries)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, payload)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


@lru_cache(maxsize=8)
def png_bomb(width: int = 30000, height: int = 30000, *, complete: bool = True) -> bytes:
    """A PNG whose IHDR says width x height, 1-bit greyscale, all rows zero.

    complete=True streams every filtered row through zlib (a valid file: 30000x30000 is about
    110 kB and decodes to 900 MP); complete=False keeps only the first 64 rows (truncated IDAT).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # depth 1, greyscale
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    rows_per_block = 256
    compressor = zlib.compressobj(9)
    parts = []
    num_rows = height if complete else min(height, 64)
    for _ in range(num_rows // rows_per_block):
        parts.append(compressor.compress(row * rows_per_block))
    parts.append(compressor.compress(row * (num_rows % rows_per_block)))
    parts.append(compressor.flush())
    chunks = [_png_chunk(b"IHDR", ihdr), _png_chunk(b"IDAT", b"".join(parts))]
    if complete:
        chunks.append(_png_chunk(b"IEND", b""))
    return PNG_SIGNATURE + b"".join(chunks)


def gif_animation(colors: Sequence[Color], *, width: int = 60, height: int = 40) -> bytes:
    """An animated GIF, one frame per colour; each frame is the colour with a white corner.

    Two colours per frame fit the palette exactly, so decoding gives back `gif_frame(...)`.
    """
    frames = [Image.fromarray(gif_frame(color, width=width, height=height)) for color in colors]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def gif_frame(color: Color, *, width: int = 60, height: int = 40) -> np.ndarray:
    """The pixels of one `gif_animation` frame, uint8 [height, width, 3]."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)  # [H, W, 3]
    pixels[:] = color
    pixels[: height // 3, : width // 3] = 255
    return pixels


def _clip_frame(index: int, width: int, height: int) -> np.ndarray:
    pixels = np.empty((height, width, 3), dtype=np.uint8)  # [H, W, 3]
    pixels[:] = ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)
    pixels[: height // 2, : width // 2] = 255 - pixels[0, 0]
    return pixels


def mp4_clip(
    num_frames: int = 20,
    *,
    fps: int = 10,
    width: int = 64,
    height: int = 48,
    frame_gap_s: int | None = None,
) -> bytes:
    """An H.264 mp4 of distinct flat frames at `fps`.

    frame_gap_s puts the frames that many seconds apart (1 s time base) instead, so a tiny
    file lasts hours: 11 frames 3600 s apart last about 36000 s.
    """
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=1 if frame_gap_s else fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        time_base = fractions.Fraction(1, 1) if frame_gap_s else fractions.Fraction(1, fps)
        stream.codec_context.time_base = time_base
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(_clip_frame(index, width, height), format="rgb24")
            frame.pts = index * (frame_gap_s or 1)
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    """`data:<mime>;base64,<payload>`."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
