"""Structured-output grammars through xgrammar: a `StructuredOutput` spec -> an xgrammar grammar.

`check_structured_output` refuses what xgrammar cannot compile (a 400 naming `response_format`)
on the CPU before any model work; `tokenizer_info` describes one of our tokenizers to xgrammar;
`GrammarCache` compiles each spec once per tokenizer and keeps a bounded number of results.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterable

import xgrammar as xgr
from tokenizers import pre_tokenizers

from internvl_core.config import SamplingParams, StructuredOutput
from internvl_core.errors import InvalidRequestError
from internvl_core.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# A bound on the work one request can ask of the converter (schemas in the wild are a few KiB).
MAX_SCHEMA_CHARS = 65_536
# json_object: any object. Not strict, else {"type": "object"} would allow only `{}`.
_ANY_OBJECT = '{"type":"object"}'
# "[12:00:00] /project/cpp/json_schema_converter.cc:5082: " in front of xgrammar's messages.
_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")
_BYTE_LEVEL_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())


def build_grammar(spec: StructuredOutput) -> xgr.Grammar:
    """The tokenizer-independent grammar of `spec`; InvalidRequestError when xgrammar refuses it.

    Whitespace between JSON tokens is fixed (`", "` and `": "`, one line): with any whitespace
    allowed, weak or small models are known to emit blanks until max_tokens.
    """
    schema = _ANY_OBJECT if spec.type == "json_object" else spec.json_schema
    assert schema is not None, "StructuredOutput validates json_schema for type json_schema"
    if len(schema) > MAX_SCHEMA_CHARS:
        raise InvalidRequestError(
            f"response_format schema has {len(schema)} characters; at most {MAX_SCHEMA_CHARS}",
            param="response_format",
        )
    try:
        return xgr.Grammar.from_json_schema(
            schema, any_whitespace=False, strict_mode=spec.type == "json_schema"
        )
    except (RuntimeError, ValueError) as e:  # xgrammar's C++ errors arrive as RuntimeError
        reason = _CPP_PREFIX.sub("", str(e)).strip()
        raise InvalidRequestError(
            f"response_format json_schema cannot be compiled: {reason}", param="response_format"
        ) from e


def check_structured_output(params: SamplingParams) -> None:
    """Refuse a `structured_output` that cannot run (CPU only; cheap for ordinary schemas)."""
    spec = params.structured_output
    if spec is None:
        return
    if params.min_tokens > 0:
        # The grammar decides where the output ends; masking the stop token before min_tokens
        # could leave a step with no allowed token at all.
        raise InvalidRequestError(
            f"min_tokens is {params.min_tokens}; it cannot be combined with response_format",
            param="response_format",
        )
    build_grammar(spec)


def tokenizer_info(
    tokenizer: Tokenizer, *, vocab_size: int, stop_token_ids: Iterable[int] = ()
) -> xgr.TokenizerInfo:
    """xgrammar's view of `tokenizer` over the model's `vocab_size` rows of logits.

    Special tokens and ids past the tokenizer's vocabulary (a head padded to a multiple of 32,
    e.g. Phi-3) get an empty string, which xgrammar never allows; stop ids are allowed where
    the grammar may end. Byte-level (Qwen2, Llama-3) and byte-fallback sentencepiece (InternLM2,
    Phi-3) vocabularies are told apart by the vocabulary itself, as xgrammar does for HF ones.
    """
    num_tokens = min(tokenizer.vocab_size, vocab_size)
    tokens = tokenizer.convert_ids_to_tokens(range(num_tokens))
    specials = tokenizer.all_special_ids
    encoded = ["" if i in specials else token for i, token in enumerate(tokens)]
    vocab_type = _vocab_type(tokens)
    prefix = "▁" if vocab_type == xgr.VocabType.BYTE_FALLBACK else "Ġ"
    first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False)[:1])
    stops = list(stop_token_ids)
    if not stops and tokenizer.eos_token_id is not None:
        stops = [tokenizer.eos_token_id]
    return xgr.TokenizerInfo(
        encoded,
        vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=stops or None,
        add_prefix_space=bool(first) and first[0].startswith(prefix),
    )


def _vocab_type(tokens: list[str]) -> xgr.VocabType:
    vocab = set(tokens)
    if sum(f"<0x{byte:02X}>" in vocab for byte in range(256)) >= 128:
        return xgr.VocabType.BYTE_FALLBACK
    if len(_BYTE_LEVEL_ALPHABET & vocab) >= 128:
        return xgr.VocabType.BYTE_LEVEL
    return xgr.VocabType.RAW


class GrammarCache:
    """Compiled grammars of one tokenizer by spec hash, least recently used evicted first.

    Bounded by entry count and by xgrammar's own size estimate; xgrammar's internal cache is
    off so this is the only one.
    """

    def __init__(
        self,
        info: xgr.TokenizerInfo,
        *,
        max_entries: int = 128,
        max_bytes: int = 1 << 30,
    ) -> None:
        self.info = info
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._compiler = xgr.GrammarCompiler(
            info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False
        )
        self._entries: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._num_bytes = 0
        self.num_compiled = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec`, compiled on first use (InvalidRequestError if bad)."""
        key = spec.key
        compiled = self._entries.get(key)
        if compiled is not None:
            self._entries.move_to_end(key)
            return compiled
        compiled = self._compiler.compile_grammar(build_grammar(spec))
        self.num_compiled += 1
        self._entries[key] = compiled
        self._num_bytes += compiled.memory_size_bytes
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_entries or self._num_bytes > self.max_bytes
        ):
            _, evicted = self._entries.popitem(last=False)
            self._num_bytes -= evicted.memory_size_bytes
        logger.debug("compiled grammar %s (%d cached)", key[:12], len(self._entries))
        return compiled
