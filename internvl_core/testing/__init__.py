"""Test support: tiny random-weight InternVL checkpoints in the original on-disk format."""

from internvl_core.testing.tiny import make_tiny_checkpoint
from internvl_core.testing.tiny_tokenizer import INTERNVL_TOKENS, write_tiny_tokenizer

__all__ = ["INTERNVL_TOKENS", "make_tiny_checkpoint", "write_tiny_tokenizer"]
