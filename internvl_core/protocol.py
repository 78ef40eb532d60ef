"""OpenAI-compatible request/response models for `/v1/chat/completions` and `/v1/models`.

In: the JSON body a client sends. Out: pydantic models the ingress validates and serialises;
sampling fields map onto the one `SamplingParams` class via `ChatCompletionRequest.sampling`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationInfo,
    field_validator,
    model_validator,
)

from internvl_core.config import SamplingParams, StructuredOutput

_STRICT = ConfigDict(extra="forbid", frozen=True)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"] = Field(description="part kind")
    text: str = Field(description="the text")


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str = Field(description="https:// or data: URL of the image")
    detail: Literal["auto", "low", "high"] = Field(
        default="auto", description="low = 1 tile; high/auto = the configured max tiles"
    )
    max_dynamic_patch: int | None = Field(
        default=None, ge=1, le=40, description="max tiles for this image (extension)"
    )


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"] = Field(description="part kind")
    image_url: ImageURL = Field(description="the image")


class VideoURL(BaseModel):
    model_config = _STRICT
    url: str = Field(description="https:// or data: URL of the video")
    num_segments: int | None = Field(default=None, ge=1, description="frames sampled (default 8)")
    bound: tuple[float, float] | None = Field(
        default=None, description="(start, end) seconds of the clip to sample"
    )
    max_dynamic_patch: int | None = Field(
        default=None, ge=1, le=40, description="tiles per frame (default 1)"
    )


class VideoPart(BaseModel):
    model_config = _STRICT
    type: Literal["video_url"] = Field(description="part kind")
    video_url: VideoURL = Field(description="the video")


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"] = Field(description="speaker")
    content: str | list[ContentPart] | None = Field(description="text or parts")
    name: str | None = Field(default=None, description="ignored; accepted for compatibility")


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's named schema."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, description="schema name (a-z, 0-9, _ -)")
    description: str | None = Field(default=None, description="what the schema is for")
    # `schema` would shadow a BaseModel attribute, hence the alias.
    json_schema: dict[str, JsonValue] = Field(alias="schema", description="the JSON Schema")
    strict: bool | None = Field(
        default=None, description="accepted; the output always follows the schema exactly"
    )


class ResponseFormat(BaseModel):
    """`response_format`: free text, any JSON object, or JSON following a schema."""

    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"] = Field(description="output kind")
    json_schema: JsonSchemaFormat | None = Field(
        default=None, description="the schema (type json_schema only)"
    )

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required for type json_schema and only for it")
        return self

    def structured_output(self) -> StructuredOutput | None:
        """The grammar spec SamplingParams carries; None for free text."""
        if self.type == "text":
            return None
        schema = self.json_schema.json_schema if self.json_schema is not None else None
        return StructuredOutput(type=self.type, json_schema=schema)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = Field(default=False, description="send a final usage chunk")
    continuous_usage_stats: bool = Field(
        default=False, description="usage so far on every chunk too (vLLM extension)"
    )


class SamplingExtensions(BaseModel):
    """vLLM's request extensions that load tools (GuideLLM, `vllm bench serve`, AIPerf) send;
    each maps onto a `SamplingParams` field the engine implements. Fields nobody knows are
    still refused: see the README's "Request fields" for why."""

    model_config = _STRICT
    ignore_eos: bool | None = Field(
        default=None, description="do not stop at the template separator (run to max_tokens)"
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, max_length=64, description="token ids that also end the answer"
    )
    include_stop_str_in_output: bool | None = Field(
        default=None, description="keep the matched stop string in the answer"
    )
    skip_special_tokens: bool | None = Field(
        default=None, description="drop special tokens from the text (default true)"
    )
    spaces_between_special_tokens: bool | None = Field(
        default=None, description="slow tokenizers: spaces around added tokens (default true)"
    )

    def extension_sampling(self) -> dict[str, object]:
        """The SamplingParams updates these fields ask for (unset fields keep the defaults)."""
        update: dict[str, object] = {
            "ignore_eos": self.ignore_eos,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
        }
        if self.stop_token_ids is not None:
            update["stop_token_ids"] = tuple(self.stop_token_ids)
        return {k: v for k, v in update.items() if v is not None}


class ChatCompletionRequest(SamplingExtensions):
    """The request body; unknown fields are refused (422) so typos never pass silently."""

    model_config = _STRICT
    model: str = Field(description="served model name")
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation")
    stream: bool = Field(default=False, description="server-sent events")
    stream_options: StreamOptions | None = Field(default=None, description="stream extras")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="nucleus mass")
    top_k: int | None = Field(default=None, ge=-1, description="0 or -1 (vLLM) disables")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="min relative prob")
    max_tokens: int | None = Field(default=None, ge=1, description="max new tokens")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="alias")
    min_tokens: int | None = Field(default=None, ge=0, description="no stop before this")
    stop: str | list[str] | None = Field(default=None, description="up to 4 stop strings")
    seed: int | None = Field(
        default=None, ge=-(2**63), le=2**64 - 1, description="sampling seed (64-bit)"
    )
    n: int = Field(default=1, ge=1, le=8, description="choices per request")
    logprobs: bool = Field(default=False, description="return token logprobs")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="alternatives")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="OpenAI")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="OpenAI")
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0, description="HF")
    max_dynamic_patch: int | None = Field(
        default=None, ge=1, le=40, description="max tiles per image (extension)"
    )
    user: str | None = Field(default=None, description="ignored; accepted for compatibility")
    response_format: ResponseFormat | None = Field(
        default=None, description="text, json_object or json_schema (structured output)"
    )

    # Field validators (not one model validator) so a refusal's `loc`, hence the error's
    # `param`, names the offending field.
    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError(f"stop takes at most 4 non-empty strings; got {len(stops)}")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        # `logprobs` is declared before `top_logprobs`, so it is already in info.data.
        if value and not info.data.get("logprobs", False):
            raise ValueError("top_logprobs requires logprobs=true")
        return value

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self, defaults: SamplingParams) -> SamplingParams:
        """The request's fields over the server defaults (one SamplingParams class for both)."""
        update: dict[str, object] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": max(self.top_k, 0) if self.top_k is not None else None,
            "min_p": self.min_p,
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "min_tokens": self.min_tokens,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "top_logprobs": self.top_logprobs,
        }
        update = {k: v for k, v in update.items() if v is not None}
        update.update(self.extension_sampling())
        if self.stop is not None:
            update["stop"] = self.stop_list
        if self.logprobs:
            update["logprobs"] = True
        if self.response_format is not None:
            update["structured_output"] = self.response_format.structured_output()
        return SamplingParams.model_validate({**defaults.model_dump(), **update})


class ErrorBody(BaseModel):
    model_config = _STRICT
    message: str = Field(description="what is wrong, naming the field and the limit")
    type: str = Field(description="error class")
    param: str | None = Field(default=None, description="offending field")
    code: str | None = Field(default=None, description="machine-readable code")


class ErrorResponse(BaseModel):
    model_config = _STRICT
    error: ErrorBody = Field(description="the error")


class Usage(BaseModel):
    model_config = _STRICT
    prompt_tokens: int = Field(description="prompt tokens, image tokens included")
    completion_tokens: int = Field(description="generated tokens")
    total_tokens: int = Field(description="sum")


class TopLogprob(BaseModel):
    model_config = _STRICT
    token: str = Field(description="token text")
    logprob: float = Field(description="log probability")
    bytes: list[int] | None = Field(default=None, description="UTF-8 bytes")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list, description="alternatives")


class ChoiceLogprobs(BaseModel):
    model_config = _STRICT
    content: list[TokenLogprob] | None = Field(description="per generated token")


class GroundingBox(BaseModel):
    model_config = _STRICT
    ref: str = Field(description="the referring text inside <ref></ref>")
    box: list[int] = Field(description="[x1, y1, x2, y2] in 0-1000 model coordinates")


class AssistantMessage(BaseModel):
    model_config = _STRICT
    role: Literal["assistant"] = Field(default="assistant", description="speaker")
    content: str = Field(description="the answer")
    boxes: list[GroundingBox] | None = Field(default=None, description="parsed grounding")


class Choice(BaseModel):
    model_config = _STRICT
    index: int = Field(description="choice index")
    message: AssistantMessage = Field(description="the answer")
    finish_reason: str | None = Field(description="stop, length, abort")
    logprobs: ChoiceLogprobs | None = Field(default=None, description="token logprobs")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    model_config = _STRICT
    id: str = Field(default_factory=completion_id, description="response id")
    object: Literal["chat.completion"] = Field(default="chat.completion", description="kind")
    created: int = Field(default_factory=lambda: int(time.time()), description="unix time")
    model: str = Field(description="served model name")
    choices: list[Choice] = Field(description="answers")
    usage: Usage = Field(description="token counts")


class Delta(BaseModel):
    model_config = _STRICT
    role: Literal["assistant"] | None = Field(default=None, description="first chunk only")
    content: str | None = Field(default=None, description="new text")


class ChunkChoice(BaseModel):
    model_config = _STRICT
    index: int = Field(description="choice index")
    delta: Delta = Field(description="new text")
    finish_reason: str | None = Field(default=None, description="set on the last chunk")
    logprobs: ChoiceLogprobs | None = Field(default=None, description="token logprobs")


class ChatCompletionChunk(BaseModel):
    model_config = _STRICT
    id: str = Field(description="same id for every chunk of a response")
    object: Literal["chat.completion.chunk"] = Field(
        default="chat.completion.chunk", description="kind"
    )
    created: int = Field(default_factory=lambda: int(time.time()), description="unix time")
    model: str = Field(description="served model name")
    choices: list[ChunkChoice] = Field(description="deltas")
    usage: Usage | None = Field(default=None, description="final chunk with include_usage")


class ModelCard(BaseModel):
    model_config = _STRICT
    id: str = Field(description="served model name")
    object: Literal["model"] = Field(default="model", description="kind")
    created: int = Field(default_factory=lambda: int(time.time()), description="unix time")
    owned_by: str = Field(default="internvl-serve", description="owner")
    max_model_len: int | None = Field(default=None, description="context limit")


class ModelList(BaseModel):
    model_config = _STRICT
    object: Literal["list"] = Field(default="list", description="kind")
    data: list[ModelCard] = Field(description="served models")
