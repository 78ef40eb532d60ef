"""A pydantic ValidationError of a request body as one OpenAI error: the field in the body's
own terms and what is wrong with it.

pydantic reports one error per union branch it tried, with branch labels in the location
(`messages.0.content.str`, `...list[tagged-union[TextPart,ImagePart,VideoPart]].0.image_url`);
the error that got deepest into the body is the one that names the user's mistake, and the
labels are not fields a user can find in their JSON.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from internvl_core.errors import RequestSchemaError

_SCALAR_LABELS = frozenset({"str", "int", "float", "bool", "bytes", "none", "any"})


def _is_label(part: str) -> bool:
    """A pydantic union-branch label (`str`, `list[...]`, a model class name), not a field."""
    return "[" in part or part in _SCALAR_LABELS or part[:1].isupper()


def body_path(loc: tuple[int | str, ...], body: Any) -> list[int | str]:
    """`loc` of a pydantic error, resolved against the body it came from: the keys and indices
    the body holds, plus a missing or unknown key; union labels and discriminator tags dropped."""
    path: list[int | str] = []
    node: Any = body
    tag_seen = False  # a discriminated union puts its tag (the part's "type") once, first
    for part in loc:
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node, tag_seen = node[part], False
        elif isinstance(node, dict) and not tag_seen and node.get("type") == part:
            tag_seen = True
        elif isinstance(node, dict) and part in node:
            path.append(part)
            node, tag_seen = node[part], False
        elif isinstance(part, str) and _is_label(part):
            continue
        else:  # a key the body lacks (missing field) or past the body's shape
            path.append(part)
            node = None
    return path


def format_path(path: list[int | str] | tuple[int | str, ...]) -> str:
    """`["messages", 0, "content"]` -> `messages[0].content`, as media errors name fields."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def schema_error(exc: ValidationError, body: Any) -> RequestSchemaError:
    """The error whose location reaches deepest into `body`, as a RequestSchemaError (422)."""
    best_path: list[int | str] = []
    best_msg = "request body does not match the schema"
    for i, error in enumerate(exc.errors()):
        path = body_path(tuple(error["loc"]), body)
        if i == 0 or len(path) > len(best_path):
            best_path, best_msg = path, error["msg"]
    param = format_path(best_path) or None
    return RequestSchemaError(f"{param}: {best_msg}" if param else best_msg, param=param)
