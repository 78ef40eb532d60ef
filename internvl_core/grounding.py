"""Parse InternVL grounding output: `<ref>text</ref><box>[[x1, y1, x2, y2], ...]</box>`.

In: the decoded answer (with <ref>/<box> tags kept). Out: [{"ref": str, "box": [x1, y1, x2, y2]}]
in the 0-1000 coordinates the model emits; a box without a preceding ref gets ref "".
"""

from __future__ import annotations

import re

# The demo worker removes these from the special tokens so they survive skip_special_tokens.
GROUNDING_TOKENS = ("<ref>", "</ref>", "<box>", "</box>")

_PAIR = re.compile(r"(?:<ref>(?P<ref>.*?)</ref>\s*)?<box>(?P<boxes>.*?)</box>", re.DOTALL)
_BOX = re.compile(r"\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]")


def parse_boxes(text: str) -> list[dict[str, object]]:
    """Every box in order; a ref with several boxes yields one entry per box."""
    found: list[dict[str, object]] = []
    for match in _PAIR.finditer(text):
        ref = (match.group("ref") or "").strip()
        for box in _BOX.finditer(match.group("boxes")):
            found.append({"ref": ref, "box": [int(v) for v in box.groups()]})
    return found
