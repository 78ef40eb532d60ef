"""Offline API mirroring the model card: `InternVLChat.from_pretrained(path).chat(...)`.

In: pixel tiles, a question, history and a HF-style generation_config. Out: the response text
(and history), built with the original prompt, splicing, stop and decoding rules; generation runs
on the same LLMEngine as the server, so batching code is shared.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams, StructuredOutput
from internvl_core.engine import LLMEngine
from internvl_core.errors import InvalidRequestError
from internvl_core.grammar import check_structured_output
from internvl_core.grounding import GROUNDING_TOKENS
from internvl_core.preprocess.image import TilingConfig, load_image
from internvl_core.preprocess.prompt import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    ConversationTemplate,
    build_query,
    expand_image_placeholders,
    get_template,
)
from internvl_core.preprocess.video import load_video
from internvl_core.protocol import ResponseFormat
from internvl_core.tokenizer import Tokenizer, load_tokenizer
from internvl_core.vision import VisionEncoder

logger = logging.getLogger(__name__)

History = list[tuple[str, str]]
_GENERATION_KEYS = {
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "num_beams",
    "response_format",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sampling_from_generation_config(config: Mapping[str, Any]) -> SamplingParams:
    """HF-style generation_config -> SamplingParams, with HF's defaults when sampling.

    Only the keys the model card uses are accepted, plus `response_format` (OpenAI's shape:
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}); anything else is
    refused by name, and so is a schema xgrammar cannot compile.
    """
    unknown = sorted(set(config) - _GENERATION_KEYS - {"eos_token_id"})
    if unknown:
        raise InvalidRequestError(
            f"generation_config keys {unknown} are not supported; allowed: "
            f"{sorted(_GENERATION_KEYS)}",
            param="generation_config",
        )
    if config.get("num_beams", 1) != 1:
        raise InvalidRequestError(
            f"generation_config.num_beams is {config['num_beams']}; only 1 is supported",
            param="num_beams",
        )
    max_new = int(config.get("max_new_tokens", 1024))
    structured = _structured_output(config.get("response_format"))
    if not config.get("do_sample", False):
        params = SamplingParams(max_tokens=max_new, temperature=0.0, structured_output=structured)
    else:
        params = SamplingParams(
            max_tokens=max_new,
            temperature=float(config.get("temperature", 1.0)),
            top_p=float(config.get("top_p", 1.0)),
            top_k=int(config.get("top_k", 50)),
            structured_output=structured,
        )
    check_structured_output(params)  # before the vision encoder runs
    return params


def _structured_output(value: Any) -> StructuredOutput | None:
    if value is None:
        return None
    try:
        return ResponseFormat.model_validate(value).structured_output()
    except ValidationError as e:
        raise InvalidRequestError(
            f"generation_config.response_format is invalid: {e}", param="response_format"
        ) from e


class InternVLChat:
    """`model.chat()` / `model.batch_chat()` with the original semantics, no remote code."""

    def __init__(
        self,
        arch: ModelArchitecture,
        tokenizer: Tokenizer,
        vision: VisionEncoder,
        engine: LLMEngine,
        *,
        system_message: str | None = None,
    ) -> None:
        self.arch = arch
        self.tokenizer = tokenizer
        self.vision = vision
        self.engine = engine
        self.template: ConversationTemplate = get_template(arch.template)
        # Original precedence: caller > config.system_message > the template's own.
        self.system_message = system_message or arch.system_message or self.template.system_message
        self.num_image_token = arch.num_image_token
        self._request_counter = 0

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device = "cpu",
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        system_message: str | None = None,
        engine_config: EngineConfig | None = None,
        keep_grounding_tokens: bool = False,
    ) -> InternVLChat:
        """Load vision tower, decoder and tokenizer from an original checkpoint folder.

        `keep_grounding_tokens` keeps `<ref>`/`<box>` tags in answers as the original demo does
        (and the server by default); the original chat() strips them.
        """
        torch_dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        if load_in_8bit and load_in_4bit:
            raise InvalidRequestError("load_in_8bit and load_in_4bit are exclusive")
        quantization = "8bit" if load_in_8bit else "4bit" if load_in_4bit else None
        arch = ModelArchitecture.from_checkpoint(path)
        kept = GROUNDING_TOKENS if keep_grounding_tokens else ()
        tokenizer = load_tokenizer(path)
        if kept:
            tokenizer = tokenizer.with_kept_special_tokens(kept)
        vision = VisionEncoder.from_checkpoint(path, dtype=torch_dtype, device=device, arch=arch)
        config = engine_config or EngineConfig(max_model_len=arch.llm.max_position_embeddings)
        engine = LLMEngine.from_checkpoint(
            path,
            config,
            dtype=torch_dtype,
            device=device,
            quantization=quantization,
            keep_special_tokens=kept,
        )
        return cls(arch, tokenizer, vision, engine, system_message=system_message)

    # ---- media, as the model card's helpers -------------------------------------------------
    def tiling(self, max_num: int | None = None) -> TilingConfig:
        return TilingConfig.from_architecture(self.arch, max_num=max_num)

    def load_image(self, source: Any, max_num: int | None = None) -> torch.Tensor:
        """float32 [tiles, 3, S, S], tiled exactly like the model card's `load_image`."""
        return torch.from_numpy(load_image(source, self.tiling(max_num)))

    def load_video(
        self,
        source: Any,
        *,
        num_segments: int = 8,
        max_num: int = 1,
        bound: tuple[float, float] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """(float32 [sum tiles, 3, S, S], tiles per frame) like the model card's `load_video`."""
        # The card's load_video always tiles frames dynamically with a thumbnail.
        cfg = TilingConfig(
            image_size=self.arch.force_image_size,
            min_num=1,
            max_num=max_num,
            use_thumbnail=True,
            dynamic=True,
        )
        pixels, num_patches = load_video(source, cfg=cfg, num_segments=num_segments, bound=bound)
        return torch.from_numpy(pixels), num_patches

    # ---- chat ---------------------------------------------------------------------------------
    def chat(self, *args: Any, **kwargs: Any) -> str | tuple[str, History]:
        """`chat(pixel_values, question, generation_config, history=None, return_history=False,
        num_patches_list=None)`; a leading tokenizer argument (the model card's form) is accepted
        and ignored, so card code runs unchanged."""
        return self._chat(*_drop_tokenizer(args), **kwargs)

    def _chat(
        self,
        pixel_values: torch.Tensor | np.ndarray | None,
        question: str,
        generation_config: Mapping[str, Any],
        history: History | None = None,
        return_history: bool = False,
        num_patches_list: Sequence[int] | None = None,
        verbose: bool = False,
    ) -> str | tuple[str, History]:
        params = sampling_from_generation_config(generation_config)
        if history is None and pixel_values is not None and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and len(pixel_values) != sum(num_patches_list):
            raise InvalidRequestError(
                f"pixel_values has {len(pixel_values)} tiles but num_patches_list sums to "
                f"{sum(num_patches_list)}",
                param="num_patches_list",
            )
        history = [] if history is None else list(history)
        query = build_query(
            self.template, question, history=history, system_message=self.system_message
        )
        query = expand_image_placeholders(query, num_patches_list, self.num_image_token)
        if verbose:
            logger.info("query: %s", query.replace(IMG_CONTEXT_TOKEN, ""))
        (token_ids,) = self._generate([query], [pixel_values], params)
        response = self._decode(token_ids)
        history.append((question, response))
        return (response, history) if return_history else response

    def batch_chat(self, *args: Any, **kwargs: Any) -> list[str]:
        """`batch_chat(pixel_values, questions, generation_config, num_patches_list=None)`:
        one image (num_patches_list[i] tiles) per question; no history, as the original."""
        return self._batch_chat(*_drop_tokenizer(args), **kwargs)

    def _batch_chat(
        self,
        pixel_values: torch.Tensor | np.ndarray | None,
        questions: Sequence[str],
        generation_config: Mapping[str, Any],
        num_patches_list: Sequence[int] | None = None,
        history: History | None = None,
        return_history: bool = False,
        image_counts: Sequence[int] | None = None,
    ) -> list[str]:
        if history is not None or return_history:
            raise InvalidRequestError("multi-turn chat is not supported in batch_chat")
        params = sampling_from_generation_config(generation_config)
        num_patches_list = image_counts if image_counts is not None else num_patches_list
        if num_patches_list is None:
            if pixel_values is not None:
                raise InvalidRequestError("batch_chat with pixel_values needs num_patches_list")
            num_patches_list = [0] * len(questions)
        if len(num_patches_list) != len(questions):
            raise InvalidRequestError(
                f"{len(questions)} questions but {len(num_patches_list)} num_patches_list entries",
                param="num_patches_list",
            )
        queries, pixels = [], []
        offset = 0
        for question, num_tiles in zip(questions, num_patches_list, strict=True):
            if pixel_values is not None and IMAGE_PLACEHOLDER not in question:
                question = IMAGE_PLACEHOLDER + "\n" + question
            query = build_query(self.template, question, system_message=self.system_message)
            queries.append(expand_image_placeholders(query, [num_tiles], self.num_image_token))
            if pixel_values is None or num_tiles == 0:
                pixels.append(None)
            else:
                pixels.append(pixel_values[offset : offset + num_tiles])
            offset += num_tiles
        outputs = self._generate(queries, pixels, params)
        return [self._decode(ids) for ids in outputs]

    # ---- internals ----------------------------------------------------------------------------
    def _generate(
        self,
        queries: list[str],
        pixels: Sequence[torch.Tensor | np.ndarray | None],
        params: SamplingParams,
    ) -> list[list[int]]:
        image_token_id = self.tokenizer.token_to_id(IMG_CONTEXT_TOKEN)
        prompts, embeds = [], []
        for query, tiles in zip(queries, pixels, strict=True):
            ids = self.tokenizer.encode(query)
            num_slots = sum(1 for t in ids if t == image_token_id)
            if tiles is None or len(tiles) == 0:
                embeds.append(None)
            else:
                rows = self.vision.encode(_as_tensor(tiles))  # [tiles, tokens, D]
                rows = rows.reshape(-1, rows.shape[-1])  # [tiles * tokens, D]
                if rows.shape[0] != num_slots:
                    raise InvalidRequestError(
                        f"prompt has {num_slots} <IMG_CONTEXT> tokens but the images give "
                        f"{rows.shape[0]} embeddings (more images than <image> placeholders?)",
                        param="pixel_values",
                    )
                embeds.append(rows)
            prompts.append(ids)
        done = self.engine.generate(prompts, params, image_embeds=embeds)
        return [list(out.token_ids) for out in done]

    def _decode(self, token_ids: list[int]) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return text.split(self.template.stop_token)[0].strip()


def _drop_tokenizer(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The model card passes the tokenizer first; tensors, arrays and None are pixel values."""
    if args and args[0] is not None and not isinstance(args[0], torch.Tensor | np.ndarray):
        return args[1:]
    return args


def _as_tensor(tiles: torch.Tensor | np.ndarray) -> torch.Tensor:
    return tiles if isinstance(tiles, torch.Tensor) else torch.from_numpy(np.asarray(tiles))
