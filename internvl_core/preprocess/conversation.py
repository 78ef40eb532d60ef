"""OpenAI chat messages -> the original chat() inputs: system message, history, question, media.

Prompt rules of the original demo: one image gives `<image>\\n` + text, several give
`Image-1: <image>\\nImage-2: <image>\\n…` + text, a video gives `Frame1: <image>\\n…`; text that
already holds one `<image>` per image is used as is; media of earlier turns stay in their turns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from internvl_core.errors import InvalidRequestError
from internvl_core.preprocess.prompt import (
    IMAGE_PLACEHOLDER,
    count_placeholders,
    multi_image_prefix,
    video_prefix,
)
from internvl_core.protocol import ChatMessage, ImagePart, TextPart, VideoPart

DEFAULT_NUM_SEGMENTS = 8


@dataclass(frozen=True, slots=True)
class MediaItem:
    """One image or video, in prompt order; a video fills `num_segments` placeholders."""

    kind: Literal["image", "video"]
    url: str
    max_tiles: int | None = None  # None = the server default (per frame for videos)
    detail: Literal["auto", "low", "high"] = "auto"
    num_segments: int = DEFAULT_NUM_SEGMENTS
    bound: tuple[float, float] | None = None
    location: str = ""  # the request field it came from, named in errors

    @property
    def num_placeholders(self) -> int:
        return self.num_segments if self.kind == "video" else 1


@dataclass(slots=True)
class ConversationPlan:
    """What chat() would receive: every media item in the order its placeholders appear."""

    system_message: str | None
    history: list[tuple[str, str]]
    question: str
    media: list[MediaItem] = field(default_factory=list)


def _media_item(
    part: ImagePart | VideoPart, request_max_tiles: int | None, location: str
) -> MediaItem:
    if isinstance(part, ImagePart):
        return MediaItem(
            kind="image",
            url=part.image_url.url,
            max_tiles=part.image_url.max_dynamic_patch or request_max_tiles,
            detail=part.image_url.detail,
            location=f"{location}.image_url.url",
        )
    video = part.video_url
    return MediaItem(
        kind="video",
        url=video.url,
        max_tiles=video.max_dynamic_patch,
        num_segments=video.num_segments or DEFAULT_NUM_SEGMENTS,
        bound=video.bound,
        location=f"{location}.video_url.url",
    )


def _user_text(
    message: ChatMessage, index: int, request_max_tiles: int | None
) -> tuple[str, list[MediaItem]]:
    """The user turn's text with media placeholders, and its media in order."""
    if message.content is None:
        raise InvalidRequestError(f"messages[{index}].content is empty", param="messages")
    if isinstance(message.content, str):
        return message.content, []
    texts = [p.text for p in message.content if isinstance(p, TextPart)]
    media = [
        _media_item(p, request_max_tiles, f"messages[{index}].content[{j}]")
        for j, p in enumerate(message.content)
        if not isinstance(p, TextPart)
    ]
    text = "\n".join(texts)
    needed = sum(m.num_placeholders for m in media)
    present = count_placeholders(text)
    if present == needed:
        return text, media
    if present:
        raise InvalidRequestError(
            f"messages[{index}] text has {present} <image> placeholders but its media need "
            f"{needed} (one per image, num_segments per video); use none or exactly {needed}",
            param=f"messages[{index}].content",
        )
    return _prefix(media) + text, media


def _prefix(media: list[MediaItem]) -> str:
    images = [m for m in media if m.kind == "image"]
    if len(media) == 1 and images:
        return multi_image_prefix(1)
    parts, image_no = [], 0
    for item in media:
        if item.kind == "image":
            image_no += 1
            parts.append(f"Image-{image_no}: {IMAGE_PLACEHOLDER}\n")
        else:
            parts.append(video_prefix(item.num_segments))
    return "".join(parts)


def plan_conversation(
    messages: list[ChatMessage], *, max_dynamic_patch: int | None = None
) -> ConversationPlan:
    """Turn OpenAI messages into (system, history, question, media); refuse malformed turns."""
    system: str | None = None
    turns: list[tuple[str, str]] = []  # (role, text)
    media: list[MediaItem] = []
    for index, message in enumerate(messages):
        if message.role == "system":
            if turns:
                raise InvalidRequestError(
                    f"messages[{index}]: a system message must come first", param="messages"
                )
            system = _plain_text(message, index)
        elif message.role == "user":
            text, items = _user_text(message, index, max_dynamic_patch)
            media.extend(items)
            if turns and turns[-1][0] == "user":
                turns[-1] = ("user", turns[-1][1] + "\n" + text)
            else:
                turns.append(("user", text))
        else:
            if not turns or turns[-1][0] != "user":
                raise InvalidRequestError(
                    f"messages[{index}]: an assistant message must follow a user message",
                    param="messages",
                )
            turns.append(("assistant", _plain_text(message, index)))
    if not turns or turns[-1][0] != "user":
        raise InvalidRequestError("the last message must be from the user", param="messages")
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return ConversationPlan(system, history, turns[-1][1], media)


def _plain_text(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    if any(not isinstance(p, TextPart) for p in message.content):
        raise InvalidRequestError(
            f"messages[{index}] ({message.role}) may only hold text parts",
            param=f"messages[{index}].content",
        )
    return "\n".join(p.text for p in message.content if isinstance(p, TextPart))
