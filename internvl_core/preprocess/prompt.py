"""Conversation templates and prompt text exactly as the original `conversation.py` + `chat()`.

In: system message, (question, answer) history, a question with `<image>` placeholders and tiles
per image. Out: the query string whose tokenization is the model input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"

# The InternVL2 (HEAD) default system message shared by all three templates.
DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)


@dataclass(frozen=True, slots=True)
class ConversationTemplate:
    """A `SeparatorStyle.MPT` template: system block, then role + message + sep per turn."""

    name: str
    system_template: str  # contains "{system_message}"
    system_message: str
    roles: tuple[str, str]  # (user, assistant)
    sep: str  # also the only stop token of chat()

    def render(self, messages: Sequence[tuple[str, str | None]], system_message: str) -> str:
        """MPT rendering: a message that is None or empty leaves only its role (the open turn)."""
        parts = [self.system_template.format(system_message=system_message), self.sep]
        for role, message in messages:
            parts.append(role + message + self.sep if message else role)
        return "".join(parts)

    @property
    def stop_token(self) -> str:
        """The token whose id chat() passes as eos_token_id (`sep.strip()`)."""
        return self.sep.strip()


_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

TEMPLATES: dict[str, ConversationTemplate] = {
    "Hermes-2": ConversationTemplate(
        name="Hermes-2",
        system_template="<|im_start|>system\n{system_message}",
        system_message=DEFAULT_SYSTEM_MESSAGE,
        roles=_CHATML_ROLES,
        sep="<|im_end|>",
    ),
    "internlm2-chat": ConversationTemplate(
        name="internlm2-chat",
        system_template="<|im_start|>system\n{system_message}",
        system_message=DEFAULT_SYSTEM_MESSAGE,
        roles=_CHATML_ROLES,
        sep="<|im_end|>",
    ),
    "phi3-chat": ConversationTemplate(
        name="phi3-chat",
        system_template="<|system|>\n{system_message}",
        system_message=DEFAULT_SYSTEM_MESSAGE,
        roles=("<|user|>\n", "<|assistant|>\n"),
        sep="<|end|>",
    ),
}


def get_template(name: str) -> ConversationTemplate:
    """Template by the name `config.json` gives (`template`)."""
    try:
        return TEMPLATES[name]
    except KeyError as e:
        raise ValueError(f"template {name!r} is unknown; supported: {sorted(TEMPLATES)}") from e


def build_query(
    template: ConversationTemplate,
    question: str,
    *,
    history: Sequence[tuple[str, str]] = (),
    system_message: str | None = None,
) -> str:
    """Prompt text of one chat turn: system, history pairs, the question, open assistant turn."""
    user, assistant = template.roles
    messages: list[tuple[str, str | None]] = []
    for old_question, old_answer in history:
        messages.append((user, old_question))
        messages.append((assistant, old_answer))
    messages.append((user, question))
    messages.append((assistant, None))
    system = template.system_message if system_message is None else system_message
    return template.render(messages, system)


def image_token_text(num_tiles: int, num_image_token: int) -> str:
    """`<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_tiles) + IMG_END_TOKEN


def expand_image_placeholders(
    query: str, num_patches_list: Sequence[int], num_image_token: int
) -> str:
    """Replace the first remaining `<image>` once per image, in order (history included).

    Placeholders left over stay literal text, as in the original.
    """
    for num_tiles in num_patches_list:
        query = query.replace(IMAGE_PLACEHOLDER, image_token_text(num_tiles, num_image_token), 1)
    return query


def count_placeholders(text: str) -> int:
    """Number of `<image>` placeholders in a text."""
    return text.count(IMAGE_PLACEHOLDER)


def multi_image_prefix(num_images: int) -> str:
    """`<image>\\n` for one image; `Image-1: <image>\\nImage-2: <image>\\n…` for several."""
    if num_images == 1:
        return IMAGE_PLACEHOLDER + "\n"
    return "".join(f"Image-{k + 1}: {IMAGE_PLACEHOLDER}\n" for k in range(num_images))


def video_prefix(num_frames: int) -> str:
    """`Frame1: <image>\\nFrame2: <image>\\n…` as the model card builds it for video."""
    return "".join(f"Frame{k + 1}: {IMAGE_PLACEHOLDER}\n" for k in range(num_frames))
