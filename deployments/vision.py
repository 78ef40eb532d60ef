"""Vision pool replica: InternViT + projector batched by tiles across requests, LRU by image hash.

In: a PreparedRequest (by reference from Preprocess). Out: an `EmbeddingPayload` with
`[num_image_tokens, D_llm]` rows in placeholder order, in the LLM dtype, or None for text-only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import numpy as np
import torch
from ray import serve

from deployments.autoscaling import PENDING_TILES
from deployments.device import resolve_device
from deployments.events import EmbeddingPayload, EncodedRequest
from deployments.metrics import VisionMetrics
from internvl_core.preprocess.request import PreparedRequest
from internvl_core.serve_args import ServeArgs
from internvl_core.vision import VisionEncoder

logger = logging.getLogger(__name__)


def _tiles_in_batch(items: list[np.ndarray]) -> int:
    return sum(int(item.shape[0]) for item in items)


class VisionDeployment:
    """One encoder per replica; `@serve.batch` groups concurrent images up to max_batch_tiles."""

    def __init__(self, args: ServeArgs) -> None:
        device, dtype = resolve_device(args.dtype)
        self.encoder = VisionEncoder.from_checkpoint(args.model_path, dtype=dtype, device=device)
        self.config = config = args.vision
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.metrics = VisionMetrics()
        self.num_encoded_tiles = 0
        self.num_cache_hits = 0
        self.num_pending_tiles = 0  # cache-miss tiles waiting for or inside an encoder batch
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
                self.cache.move_to_end(image.content_hash)
                found[image.content_hash] = cached
                self.num_cache_hits += 1
                self.metrics.cache_hits.inc()
            else:
                todo.setdefault(image.content_hash, image.tiles)  # uint8 [T, S, S, 3]
        if todo:
            self.metrics.cache_misses.inc(len(todo))
            outputs = await asyncio.gather(*(self._encode_counted(px) for px in todo.values()))
            for key, rows in zip(todo, outputs, strict=True):
                found[key] = rows
                self._remember(key, rows)
        rows = torch.cat([found[image.content_hash] for image in prepared.images])
        return EncodedRequest.of(prepared, EmbeddingPayload.from_tensor(rows))  # [N_img, D_llm]

    async def _encode_counted(self, pixels: np.ndarray) -> torch.Tensor:
        """`_encode_batch` for one image, its tiles counted as pending until it returns, fails
        or is cancelled (the queued_tiles autoscaling signal)."""
        num_tiles = int(pixels.shape[0])
        self.num_pending_tiles += num_tiles
        try:
            return await self._encode_batch(pixels)
        finally:
            self.num_pending_tiles -= num_tiles

    def _remember(self, key: str, rows: torch.Tensor) -> None:
        if self.config.cache_entries == 0:
            return
        self.cache[key] = rows
        while len(self.cache) > self.config.cache_entries:
            self.cache.popitem(last=False)

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
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve polls this for the queued_tiles policy (deployments.autoscaling)."""
        return {PENDING_TILES: float(self.num_pending_tiles)}

    async def health(self) -> bool:
        return True
