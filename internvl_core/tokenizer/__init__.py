"""Checkpoint tokenizers without remote code: `load_tokenizer(path) -> Tokenizer`."""

from internvl_core.tokenizer.internlm2 import AddedTokenSpec, InternLM2Tokenizer
from internvl_core.tokenizer.loader import Tokenizer, TokenizerBackend, load_tokenizer

__all__ = [
    "AddedTokenSpec",
    "InternLM2Tokenizer",
    "Tokenizer",
    "TokenizerBackend",
    "load_tokenizer",
]
