"""Vision pool replica: InternViT + projector batched by tiles across requests, cached by hash.

In: a PreparedRequest (by reference from Preprocess). Out: an `EmbeddingPayload` with
`[num_image_tokens, D_llm]` rows in placeholder order, in the LLM dtype, or None for text-only.
An image with more tiles than a batch holds is encoded in chunks; identical images in flight once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np
import torch
from ray import serve

from deployments.autoscaling import PENDING_TILES
from deployments.device import resolve_device
from deployments.embedding_cache import EmbeddingCache
from deployments.events import EmbeddingPayload, EncodedRequest
from deployments.metrics import VisionMetrics
from deployments.single_flight import SingleFlight
from internvl_core.gather import gather_or_cancel
from internvl_core.preprocess.request import PreparedRequest
from internvl_core.serve_args import ServeArgs
from internvl_core.vision import VisionEncoder

logger = logging.getLogger(__name__)


def _tiles_in_batch(items: list[np.ndarray]) -> int:
    return sum(int(item.shape[0]) for item in items)


def split_tiles(tiles: np.ndarray, max_tiles: int) -> list[np.ndarray]:
    """[T, S, S, 3] -> views of at most `max_tiles` tiles each, in order (a batch item must not
    exceed `max_batch_tiles`: Ray fails a larger one with "Size of item is greater than
    max_batch_size")."""
    if max_tiles < 1:
        raise ValueError(f"max_tiles is {max_tiles}; must be at least 1")
    return [tiles[start : start + max_tiles] for start in range(0, tiles.shape[0], max_tiles)]


class VisionDeployment:
    """One encoder per replica; `@serve.batch` packs images (or chunks of a larger one) from
    concurrent requests into batches of at most max_batch_tiles tiles."""

    def __init__(self, args: ServeArgs) -> None:
        device, dtype = resolve_device(args.dtype)
        self.encoder = VisionEncoder.from_checkpoint(args.model_path, dtype=dtype, device=device)
        self.config = config = args.vision
        self.cache = EmbeddingCache(config.cache_bytes)
        self.inflight: SingleFlight[torch.Tensor] = SingleFlight()
        self.metrics = VisionMetrics()
        self.num_encoded_tiles = 0
        self.num_cache_hits = 0
        self.num_pending_tiles = 0  # cache-miss tiles waiting for or inside an encoder batch
        self.last_encode_ok = -float("inf")  # monotonic time of the last successful encode
        size = self.encoder.arch.force_image_size
        self._probe_tile = np.zeros((1, size, size, 3), dtype=np.uint8)  # [1, S, S, 3]
        self._encode_batch.set_max_batch_size(config.max_batch_tiles)
        self._encode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    async def encode(self, prepared: PreparedRequest) -> EncodedRequest:
        """Embeddings of every image of the request, cached by content hash, with the request
        (pixels dropped) for the LLM replica."""
        if not prepared.images:
            return EncodedRequest.of(prepared, None)
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, np.ndarray] = {}
        for image in prepared.images:
            cached = self.cache.get(image.content_hash)
            if cached is not None:
                found[image.content_hash] = cached
                self.num_cache_hits += 1
                self.metrics.cache_hits.inc()
            else:
                todo.setdefault(image.content_hash, image.tiles)  # uint8 [T, S, S, 3]
        if todo:
            self.metrics.cache_misses.inc(len(todo))
            outputs = await gather_or_cancel(
                [self.inflight.run(key, self._encoder_of(key, px)) for key, px in todo.items()]
            )
            found.update(zip(todo, outputs, strict=True))
        rows = torch.cat([found[image.content_hash] for image in prepared.images])
        return EncodedRequest.of(prepared, EmbeddingPayload.from_tensor(rows))  # [N_img, D_llm]

    def _encoder_of(self, key: str, tiles: np.ndarray) -> Callable[[], Awaitable[torch.Tensor]]:
        """The one encode of an image that concurrent requests for `key` share."""
        return lambda: self._encode_image(key, tiles)

    async def _encode_image(self, key: str, tiles: np.ndarray) -> torch.Tensor:
        """All tiles of one image as batch items of at most max_batch_tiles, rows reassembled in
        tile order and cached: [T * num_image_token, D_llm]."""
        chunks = split_tiles(tiles, self.config.max_batch_tiles)
        parts = await gather_or_cancel([self._encode_counted(chunk) for chunk in chunks])
        rows = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T * tokens, D]
        self.cache.put(key, rows)
        return rows

    async def _encode_counted(self, pixels: np.ndarray) -> torch.Tensor:
        """`_encode_batch` for one chunk, its tiles counted as pending until it returns, fails
        or is cancelled (the queued_tiles autoscaling signal)."""
        num_tiles = int(pixels.shape[0])
        assert num_tiles <= self.config.max_batch_tiles  # else Ray fails the item (HTTP 500)
        self.num_pending_tiles += num_tiles
        try:
            return await self._encode_batch(pixels)
        finally:
            self.num_pending_tiles -= num_tiles

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=_tiles_in_batch)
    async def _encode_batch(self, items: list[np.ndarray]) -> list[torch.Tensor]:
        """Tiles of several images in one encoder call; returns per-image token rows."""
        pixels = np.concatenate(items)  # uint8 [sum tiles, S, S, 3], normalised by the encoder
        start = time.perf_counter()
        out = await asyncio.to_thread(
            self.encoder.encode, pixels, max_batch_tiles=self.config.max_batch_tiles
        )  # [sum tiles, tokens, D]
        self.metrics.encode_s.observe(time.perf_counter() - start)
        self.metrics.batch_tiles.observe(pixels.shape[0])
        self.num_encoded_tiles += int(pixels.shape[0])
        self.last_encode_ok = time.monotonic()
        results, offset = [], 0
        for item in items:
            count = int(item.shape[0])
            rows = out[offset : offset + count].reshape(-1, out.shape[-1])  # [count*tokens, D]
            results.append(rows.cpu())
            offset += count
        return results

    def stats(self) -> dict[str, int]:
        return {
            "encoded_tiles": self.num_encoded_tiles,
            "cache_hits": self.num_cache_hits,
            "cache_entries": len(self.cache),
            "cache_bytes": self.cache.num_bytes,
            "inflight_joins": self.inflight.num_joined,
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve polls this for the queued_tiles policy (deployments.autoscaling)."""
        return {PENDING_TILES: float(self.num_pending_tiles)}

    async def health(self) -> bool:
        await self.check_health()
        return True

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy (replaced).

        Encodes one blank tile on the replica's device, directly (not behind queued batches),
        unless an encode succeeded within `health_encode_interval_s`.
        """
        if time.monotonic() - self.last_encode_ok < self.config.health_encode_interval_s:
            return
        try:
            out = await asyncio.to_thread(self.encoder.encode, self._probe_tile)
        except Exception as e:
            raise RuntimeError(f"vision encoder failed a one-tile encode: {e!r}") from e
        # out: [1, num_image_token, D_llm]
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError("vision encoder returned non-finite embeddings for a blank tile")
        self.last_encode_ok = time.monotonic()
