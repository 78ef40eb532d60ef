"""Test support: tiny random-weight InternVL checkpoints in the original on-disk format."""

from __future__ import annotations

from typing import Any

from internvl_core.testing.tiny_tokenizer import INTERNVL_TOKENS, write_tiny_tokenizer

__all__ = ["INTERNVL_TOKENS", "make_tiny_checkpoint", "write_tiny_tokenizer"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m internvl_core.testing.tiny` does not import the module twice.
    if name == "make_tiny_checkpoint":
        from internvl_core.testing.tiny import make_tiny_checkpoint

        return make_tiny_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
