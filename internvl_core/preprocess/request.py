"""Server-side preprocessing of one chat request: media, tiles, prompt ids, every limit checked.

In: a validated `ChatCompletionRequest`. Out: a `PreparedRequest` (prompt token ids, numpy pixel
tiles per image in placeholder order with content hashes, sampling params), built with exactly the
prompt rules of `InternVLChat.chat`, or an InvalidRequestError naming the limit and the knob.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams
from internvl_core.errors import (
    ContextLengthError,
    InternVLError,
    InvalidRequestError,
    MediaError,
    PayloadTooLargeError,
)
from internvl_core.gather import gather_or_cancel
from internvl_core.grammar import check_structured_output
from internvl_core.preprocess.conversation import MediaItem, plan_conversation
from internvl_core.preprocess.image import (
    TilingConfig,
    normalize_pixels,
    open_image,
    tile_pixels,
)
from internvl_core.preprocess.media import MediaFetcher
from internvl_core.preprocess.prompt import (
    IMG_CONTEXT_TOKEN,
    build_query,
    count_placeholders,
    expand_image_placeholders,
    get_template,
)
from internvl_core.preprocess.video import load_video_tiles, video_info
from internvl_core.protocol import ChatCompletionRequest
from internvl_core.serve_args import MediaLimits
from internvl_core.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ALLOWED_IMAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
MAX_BOUND_S = 100_000.0
_GENERIC_PARAMS = frozenset({"image", "image_url", "video"})


@dataclass(slots=True)
class PreparedImage:
    """One image (or video frame): its tiles as uint8 RGB and a hash of its content.

    Tiles travel as bytes, a quarter of the float32 pixels, and the vision pool normalises
    them where it encodes (`VisionEncoder.encode`); `pixel_values` is the same normalisation
    on the CPU, for callers that want the model card's float tiles.
    """

    tiles: np.ndarray  # [num_tiles, S, S, 3] uint8
    content_hash: str

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def pixel_values(self) -> np.ndarray:
        """float32 [num_tiles, 3, S, S], equal to the model card's `load_image` output."""
        return normalize_pixels([self.tiles], int(self.tiles.shape[1]))


@dataclass(slots=True)
class PreparedRequest:
    """Everything the vision pool and the LLM replica need; arrays travel by reference."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    images: list[PreparedImage] = field(default_factory=list)
    num_image_tokens: int = 0

    @property
    def num_tiles(self) -> int:
        return sum(image.num_tiles for image in self.images)


def content_hash(data: bytes | np.ndarray) -> str:
    """Stable content hash (embedding cache and prefix-cache keys)."""
    raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


class RequestPreparer:
    """Turns requests into PreparedRequests for one model; one per Preprocess replica."""

    def __init__(
        self,
        arch: ModelArchitecture,
        tokenizer: Tokenizer,
        limits: MediaLimits,
        engine: EngineConfig,
        default_sampling: SamplingParams,
    ) -> None:
        self.arch = arch
        self.tokenizer = tokenizer
        self.limits = limits
        self.engine = engine
        # The same capped limit as the engine's and /v1/models' (EngineConfig.max_model_len_for).
        self.max_model_len = engine.max_model_len_for(arch.llm)
        self.default_sampling = default_sampling
        self.template = get_template(arch.template)
        self.system_message = arch.system_message or self.template.system_message
        self.fetcher = MediaFetcher(limits)

    async def prepare(self, request: ChatCompletionRequest, request_id: str) -> PreparedRequest:
        # A response_format xgrammar refuses is a 400 before any fetch or model work.
        check_structured_output(request.sampling(self.default_sampling))
        plan = plan_conversation(request.messages, max_dynamic_patch=request.max_dynamic_patch)
        self._check_media(plan.media)
        groups = await gather_or_cancel([self._load_media(item) for item in plan.media])
        images = [image for group in groups for image in group]
        num_tiles = sum(image.num_tiles for image in images)
        if num_tiles > self.limits.max_tiles_per_request:
            raise InvalidRequestError(
                f"request needs {num_tiles} image tiles; max_tiles_per_request is "
                f"{self.limits.max_tiles_per_request} (lower max_dynamic_patch or use detail=low)",
                param="max_dynamic_patch",
            )
        system = plan.system_message if plan.system_message is not None else self.system_message
        query = build_query(
            self.template, plan.question, history=plan.history, system_message=system
        )
        if count_placeholders(query) < len(images):
            raise InvalidRequestError("more images than <image> placeholders", param="messages")
        query = expand_image_placeholders(
            query, [image.num_tiles for image in images], self.arch.num_image_token
        )
        token_ids = self.tokenizer.encode(query)
        if images:
            self._check_image_slots(token_ids, num_tiles)
        sampling = self._fit_sampling(request, len(token_ids), num_tiles)
        return PreparedRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling=sampling,
            images=images,
            num_image_tokens=num_tiles * self.arch.num_image_token,
        )

    def _check_media(self, media: list[MediaItem]) -> None:
        """Counts and video fields that need no bytes: refused before any fetch starts."""
        num_pictures = sum(item.num_placeholders for item in media)
        if num_pictures > self.limits.max_images_per_request:
            raise InvalidRequestError(
                f"request has {num_pictures} images and video frames; "
                f"max_images_per_request is {self.limits.max_images_per_request}",
                param="messages",
            )
        for item in media:
            if item.kind != "video":
                continue
            if item.num_segments > self.limits.max_num_segments:
                raise InvalidRequestError(
                    f"num_segments is {item.num_segments}; max_num_segments is "
                    f"{self.limits.max_num_segments}",
                    param="num_segments",
                )
            # NaN/inf (valid JSON for pydantic) would crash frame indexing; the original's own
            # "whole video" bound is +-100000 s, so nothing beyond it selects other frames.
            if item.bound is not None and not all(
                math.isfinite(t) and abs(t) <= MAX_BOUND_S for t in item.bound
            ):
                raise InvalidRequestError(
                    f"video bound {item.bound} must hold finite seconds within +-{MAX_BOUND_S}",
                    param="bound",
                )

    def _check_image_slots(self, token_ids: list[int], num_tiles: int) -> None:
        """Text typed as `<IMG_CONTEXT>` would shift every image row (the original fails in
        generate()); refuse it here, before the vision pool encodes anything."""
        expected = num_tiles * self.arch.num_image_token
        num_slots = token_ids.count(self.tokenizer.token_to_id(IMG_CONTEXT_TOKEN))
        if num_slots != expected:
            raise InvalidRequestError(
                f"the messages' text holds the reserved token {IMG_CONTEXT_TOKEN} "
                f"{num_slots - expected} time(s); it may not appear in a request with images",
                param="messages",
            )

    def _fit_sampling(
        self, request: ChatCompletionRequest, prompt_len: int, num_tiles: int
    ) -> SamplingParams:
        sampling = request.sampling(self.default_sampling)
        limit = self.max_model_len
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        asked = request.max_completion_tokens or request.max_tokens
        if asked is not None and asked >= limit:  # no prompt can fit next to it
            raise ContextLengthError(
                f"{field} {asked} alone fills max_model_len {limit} (the prompt needs at least "
                f"one token); this prompt of {prompt_len} tokens allows {field} up to "
                f"{max(limit - prompt_len, 0)}",
                param=field,
            )
        if prompt_len >= limit or (asked is not None and prompt_len + asked > limit):
            raise ContextLengthError(
                f"prompt has {prompt_len} tokens{self._image_share(num_tiles)} + {field} "
                f"{asked or 1} > max_model_len {limit}; {self._shorten_hint(num_tiles)}",
                param="messages",
            )
        if prompt_len + sampling.max_tokens > limit:
            sampling = sampling.model_copy(update={"max_tokens": limit - prompt_len})
        return sampling

    def _image_share(self, num_tiles: int) -> str:
        if not num_tiles:
            return ""
        image_tokens = num_tiles * self.arch.num_image_token
        return f" ({image_tokens} of them image tokens from {num_tiles} tiles)"

    @staticmethod
    def _shorten_hint(num_tiles: int) -> str:
        if num_tiles:
            return (
                "reduce max_dynamic_patch, use detail=low, send fewer images, shorten the text "
                "or lower max_tokens"
            )
        return "shorten the messages or lower max_tokens"

    def _tiling(self, item: MediaItem) -> TilingConfig:
        default = self.limits.max_dynamic_patch or self.arch.max_dynamic_patch
        max_num = 1 if item.detail == "low" else (item.max_tiles or default)
        return TilingConfig.from_architecture(self.arch, max_num=max_num)

    async def _load_media(self, item: MediaItem) -> list[PreparedImage]:
        try:
            return await self._fetch_and_decode(item)
        except InternVLError as e:
            # Name the offending part (messages[0].content[1].image_url.url) where the error has
            # no param or only the decoders' generic "image"/"video"; keep specific ones (bound).
            if e.param is None or e.param in _GENERIC_PARAMS:
                e.param = item.location or None
            raise

    async def _fetch_and_decode(self, item: MediaItem) -> list[PreparedImage]:
        if item.kind == "image":
            data = await self.fetcher.fetch(
                item.url, self.limits.max_image_bytes, limit_name="max_image_bytes"
            )
            image = await asyncio.to_thread(self._decode_image, data, self._tiling(item))
            return [image]
        data = await self.fetcher.fetch(
            item.url, self.limits.max_video_bytes, limit_name="max_video_bytes"
        )
        return await asyncio.to_thread(self._decode_video, data, item)

    def _decode_image(self, data: bytes, tiling: TilingConfig) -> PreparedImage:
        try:
            header = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            # PIL's own guard refuses huge headers (e.g. 30000x30000) inside open().
            raise PayloadTooLargeError(
                f"image is over the decoder's pixel limit ({e}); max_image_pixels is "
                f"{self.limits.max_image_pixels}"
            ) from e
        except Exception as e:  # PIL raises many types for garbage input
            raise MediaError(f"image could not be decoded: {type(e).__name__}: {e}") from e
        if header.format not in ALLOWED_IMAGE_FORMATS:
            raise MediaError(
                f"image format {header.format} is not allowed; allowed: "
                f"{sorted(ALLOWED_IMAGE_FORMATS)}"
            )
        width, height = header.size
        if width * height > self.limits.max_image_pixels:
            raise PayloadTooLargeError(
                f"image is {width}x{height} = {width * height} pixels; max_image_pixels is "
                f"{self.limits.max_image_pixels}"
            )
        tiles = np.concatenate(tile_pixels(open_image(header), tiling))  # [tiles, S, S, 3]
        return PreparedImage(tiles, content_hash(data) + f":{tiling.max_num}")

    def _decode_video(self, data: bytes, item: MediaItem) -> list[PreparedImage]:
        info = video_info(data)
        if info.duration_s > self.limits.max_video_duration_s:
            raise PayloadTooLargeError(
                f"video lasts {info.duration_s:.0f} s; max_video_duration_s is "
                f"{self.limits.max_video_duration_s:.0f}"
            )
        if info.width * info.height > self.limits.max_image_pixels:
            raise PayloadTooLargeError(
                f"video frames are {info.width}x{info.height}; max_image_pixels is "
                f"{self.limits.max_image_pixels}"
            )
        tiling = TilingConfig(
            image_size=self.arch.force_image_size,
            min_num=1,
            max_num=item.max_tiles or 1,
            use_thumbnail=True,
            dynamic=True,
        )
        all_tiles, num_patches = load_video_tiles(
            data, cfg=tiling, num_segments=item.num_segments, bound=item.bound
        )
        frames, offset = [], 0
        for count in num_patches:
            tiles = all_tiles[offset : offset + count]  # [count, S, S, 3] uint8
            frames.append(PreparedImage(tiles, content_hash(tiles)))
            offset += count
        return frames
