"""Preprocess replica (CPU): fetch and decode media, tile, build prompt ids, check every limit.

In: a validated ChatCompletionRequest. Out: a PreparedRequest whose numpy arrays travel by
reference to the vision pool and the LLM replica. Refusals happen here, before any GPU work.
"""

from __future__ import annotations

import asyncio
import logging
import time

from PIL import Image

from deployments.client_errors import log_client_errors_in_one_line
from deployments.metrics import PreprocessMetrics
from internvl_core.config import ModelArchitecture
from internvl_core.preprocess.image import _resize_pool
from internvl_core.preprocess.prompt import IMG_CONTEXT_TOKEN
from internvl_core.preprocess.request import PreparedRequest, RequestPreparer
from internvl_core.protocol import ChatCompletionRequest
from internvl_core.serve_args import ServeArgs
from internvl_core.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class PreprocessDeployment:
    """One RequestPreparer (tokenizer, media fetcher with its connection pool) per replica."""

    def __init__(self, args: ServeArgs) -> None:
        log_client_errors_in_one_line()  # refusals are routine here: no tracebacks for them
        arch = ModelArchitecture.from_checkpoint(args.model_path)
        tokenizer = load_tokenizer(args.model_path)
        self.preparer = RequestPreparer(
            arch, tokenizer, args.media, args.engine, args.default_sampling
        )
        self.metrics = PreprocessMetrics()
        # What every image request relies on: the placeholder is one special token.
        self._probe_text = f"<img>{IMG_CONTEXT_TOKEN * 2}</img>"
        self._probe_ids = tokenizer.encode(self._probe_text)
        self._probe_image = Image.new("RGB", (2, 2))

    async def prepare(self, request: ChatCompletionRequest, request_id: str) -> PreparedRequest:
        start = time.perf_counter()
        fetched = self.preparer.fetcher.bytes_fetched
        prepared = await self.preparer.prepare(request, request_id)
        self.metrics.seconds.observe(time.perf_counter() - start)
        fetched = self.preparer.fetcher.bytes_fetched - fetched
        if fetched > 0:  # Ray counters refuse inc(0)
            self.metrics.bytes.inc(fetched)
        logger.debug(
            "request %s: %d prompt tokens, %d tiles, %.1f ms",
            request_id,
            len(prepared.prompt_token_ids),
            prepared.num_tiles,
            (time.perf_counter() - start) * 1e3,
        )
        return prepared

    async def health(self) -> bool:
        await self.check_health()
        return True

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy (replaced).

        Cheap (microseconds of CPU): the tokenizer still maps image placeholders as at start,
        and the thumbnail pool that tiling waits on accepts and finishes work. The probe is
        awaited without blocking the event loop, so it never delays requests.
        """
        ids = self.preparer.tokenizer.encode(self._probe_text)
        if ids != self._probe_ids:
            raise RuntimeError(
                f"tokenizer maps {self._probe_text!r} to {ids}, not {self._probe_ids}"
            )
        try:
            done = _resize_pool().submit(self._probe_image.resize, (1, 1))
            await asyncio.wrap_future(done)
        except RuntimeError as e:  # "cannot schedule new futures after shutdown"
            raise RuntimeError(f"thumbnail pool is not running: {e}") from e
