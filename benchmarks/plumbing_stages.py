"""Model-free stand-ins for the three stages, to time the Serve graph's plumbing alone.

`benchmarks/serve.py` deploys them with the real ingress (`deployments.app.compose_app`) and
replays the same requests: every HTTP request, Serve call, by-reference hop and streamed event
of a real run happens, with the same array sizes, but no image is decoded or resized, no
encoder or decoder runs. The CPU they spend per request is the graph's floor on this machine.

- Preprocess: the real template, tokenizer and limits; images are measured from their header
  (tile count) and handed on as zero uint8 tiles of the real shape [tiles, S, S, 3].
- VisionEncoder: zero embeddings of the real shape [image tokens, D_llm].
- LLM: `events_per_request` events (the real run's mean), `max_tokens` tokens spread over them.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from PIL import Image

from deployments.events import EmbeddingPayload, EncodedRequest, GenerationEvent
from deployments.preprocess import PreprocessDeployment
from internvl_core.config import ModelArchitecture
from internvl_core.preprocess.image import TilingConfig, count_tiles
from internvl_core.preprocess.request import PreparedImage, PreparedRequest, RequestPreparer
from internvl_core.serve_args import ServeArgs

EVENT_SPACING_S = 0.005  # a real stream's events are apart in time; these are too


class _HeaderOnlyPreparer(RequestPreparer):
    def _decode_image(self, data: bytes, tiling: TilingConfig) -> PreparedImage:
        with Image.open(io.BytesIO(data)) as header:
            num_tiles = count_tiles(header.width, header.height, tiling)
        size = tiling.image_size
        tiles = np.zeros((num_tiles, size, size, 3), dtype=np.uint8)  # [tiles, S, S, 3]
        return PreparedImage(tiles, uuid.uuid4().hex)


class PlumbingPreprocess(PreprocessDeployment):
    def __init__(self, args: ServeArgs) -> None:
        super().__init__(args)
        real = self.preparer
        self.preparer = _HeaderOnlyPreparer(
            real.arch, real.tokenizer, real.limits, real.engine, real.default_sampling
        )


class PlumbingVision:
    def __init__(self, args: ServeArgs) -> None:
        self.hidden_size = ModelArchitecture.from_checkpoint(args.model_path).llm.hidden_size

    async def encode(self, prepared: PreparedRequest) -> EncodedRequest:
        if not prepared.images:
            return EncodedRequest.of(prepared, None)
        rows = np.zeros((prepared.num_image_tokens, self.hidden_size), dtype=np.float32)
        return EncodedRequest.of(prepared, EmbeddingPayload(rows, "float32"))

    async def health(self) -> bool:
        return True


class PlumbingLLM:
    """`events_per_request` is set on a subclass (`plumbing_llm`): Serve builds it with args."""

    events_per_request = 1

    def __init__(self, args: ServeArgs) -> None:
        self.args = args

    async def generate(
        self,
        prepared: PreparedRequest | EncodedRequest,
        embeds: Any = None,
        choice_index: int = 0,
        stream_interval_s: float = 0.0,
    ) -> AsyncIterator[dict[str, Any]]:
        if isinstance(prepared, EncodedRequest):
            prepared = prepared.prepared
        num_prompt = len(prepared.prompt_token_ids)
        max_tokens = prepared.sampling.max_tokens
        num_events = max(1, min(self.events_per_request, max_tokens))
        done = 0
        for i in range(num_events):
            count = (max_tokens * (i + 1)) // num_events - done
            done += count
            last = i == num_events - 1
            yield GenerationEvent(
                text=" tok" * count,
                token_ids=[0] * count,
                finish_reason="length" if last else None,
                num_prompt_tokens=num_prompt,
                num_output_tokens=done,
            ).to_wire()
            if not last:
                await asyncio.sleep(EVENT_SPACING_S)

    async def health(self) -> bool:
        return True


def plumbing_llm(events_per_request: int) -> type[PlumbingLLM]:
    return type("PlumbingLLM", (PlumbingLLM,), {"events_per_request": events_per_request})
