"""The checkpoint's own tokenizer, loaded without remote code, behind one small `Tokenizer` class.

`tokenizer.json` -> a transformers fast tokenizer; `tokenizer.model` -> our sentencepiece class
(InternLM2, or slow-Llama semantics for Yi). Text in, ids out, and back, as `model.chat()` does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast

from internvl_core.errors import CheckpointError, InvalidRequestError
from internvl_core.tokenizer.internlm2 import (
    AddedTokenSpec,
    InternLM2Tokenizer,
    clean_up_tokenization,
)

logger = logging.getLogger(__name__)

_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "YiTokenizer")


class TokenizerBackend(Protocol):
    """What `Tokenizer` needs from a concrete tokenizer implementation."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    special_ids: frozenset[int]

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def decode(
        self,
        ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        special_ids: frozenset[int] | None = None,
        spaces_between_special_tokens: bool = True,
    ) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]: ...

    def convert_tokens_to_string(
        self, tokens: Sequence[str], *, special_tokens: frozenset[str] | None = None
    ) -> str: ...


class Tokenizer:
    """The tokenizer API the rest of the codebase uses (never transformers' directly)."""

    def __init__(
        self,
        backend: TokenizerBackend,
        *,
        special_ids: frozenset[int] | None = None,
        name_or_path: str = "",
    ) -> None:
        self._backend = backend
        self.name_or_path = name_or_path
        self.bos_token_id: int | None = backend.bos_token_id
        self.eos_token_id: int | None = backend.eos_token_id
        self.all_special_ids: frozenset[int] = (
            backend.special_ids if special_ids is None else special_ids
        )
        self.vocab_size: int = backend.vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        kind = type(self._backend).__name__
        return f"Tokenizer({kind}, vocab_size={self.vocab_size}, path={self.name_or_path!r})"

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; `add_special_tokens` adds bos exactly as the checkpoint's tokenizer."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens)

    def decode(
        self,
        ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        """Text of `ids`; special ids (minus kept ones) are dropped when skipping.
        `spaces_between_special_tokens` is the slow tokenizers' join of added tokens (fast
        tokenizers ignore it, as in transformers)."""
        return self._backend.decode(
            list(ids),
            skip_special_tokens=skip_special_tokens,
            special_ids=self.all_special_ids,
            spaces_between_special_tokens=spaces_between_special_tokens,
        )

    def batch_decode(
        self, seqs: Iterable[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in seqs]

    def token_to_id(self, token: str) -> int | None:
        """`convert_tokens_to_ids` for one token; None when the vocabulary lacks it."""
        return self._backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self._backend.convert_ids_to_tokens(list(ids))

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Tokens (as `convert_ids_to_tokens` gives them) to text, for incremental decoding."""
        specials = frozenset(self._backend.convert_ids_to_tokens(sorted(self.all_special_ids)))
        return self._backend.convert_tokens_to_string(list(tokens), special_tokens=specials)

    def with_kept_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        """A view whose `skip_special_tokens` keeps `tokens` (the demo's `<ref>`/`<box>` trick)."""
        kept = {self.token_to_id(token) for token in tokens} - {None}
        return Tokenizer(
            self._backend,
            special_ids=self.all_special_ids - kept,
            name_or_path=self.name_or_path,
        )


class FastTokenizerBackend:
    """`tokenizer.json` through transformers' fast tokenizer, decode rules of transformers 4.37."""

    def __init__(self, path: Path, config: dict[str, Any], special_map: dict[str, Any]) -> None:
        kwargs: dict[str, Any] = {}
        for name in _NAMED_TOKENS:
            value = _token_content(config.get(name, special_map.get(name)))
            if value is not None:
                kwargs[name] = value
        for flag in ("add_bos_token", "add_eos_token"):
            if flag in config:
                kwargs[flag] = bool(config[flag])
        # Cleanup is applied by `decode` below: transformers 5 skips it for BPE, 4.37 did not.
        self._hf = PreTrainedTokenizerFast(
            tokenizer_file=str(path / "tokenizer.json"),
            clean_up_tokenization_spaces=False,
            **kwargs,
        )
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        missing = [s for s in _added_token_specs(config, {}) if s.content not in self._hf.vocab]
        if missing:
            self._hf.add_tokens([_hf_added_token(s) for s in missing])
        backend = self._hf.backend_tokenizer
        self.vocab_size = len(self._hf)
        self.bos_token_id = self._named_id(kwargs.get("bos_token"))
        self.eos_token_id = self._named_id(kwargs.get("eos_token"))
        named = {self._named_id(kwargs.get(name)) for name in _NAMED_TOKENS} - {None}
        additional = config.get("additional_special_tokens") or special_map.get(
            "additional_special_tokens", []
        )
        flagged = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        listed = {backend.token_to_id(c) for c in map(_token_content, additional)} - {None}
        self.special_ids = frozenset(i for i in named | flagged | listed if i is not None)

    def _named_id(self, token: str | None) -> int | None:
        return None if token is None else self._hf.backend_tokenizer.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(
        self,
        ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        special_ids: frozenset[int] | None = None,
        spaces_between_special_tokens: bool = True,  # ignored, as by transformers' fast decode
    ) -> str:
        special_ids = self.special_ids if special_ids is None else special_ids
        if skip_special_tokens:
            ids = [i for i in ids if i not in special_ids]
        text = self._hf.backend_tokenizer.decode(list(ids), skip_special_tokens=False)
        return clean_up_tokenization(text) if self._clean_up else text

    def token_to_id(self, token: str) -> int | None:
        return self._hf.backend_tokenizer.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        tokens: list[str] = []
        for token_id in ids:
            token = self._hf.backend_tokenizer.id_to_token(token_id)
            if token is None:
                raise InvalidRequestError(
                    f"token id {token_id} is out of range; vocab_size is {self.vocab_size}"
                )
            tokens.append(token)
        return tokens

    def convert_tokens_to_string(
        self, tokens: Sequence[str], *, special_tokens: frozenset[str] | None = None
    ) -> str:
        return self._hf.convert_tokens_to_string(list(tokens))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder, never running its remote code (`auto_map` ignored)."""
    folder = Path(path)
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    if (folder / "tokenizer.json").is_file():
        backend: TokenizerBackend = FastTokenizerBackend(folder, config, special_map)
    elif (folder / "tokenizer.model").is_file():
        backend = _sentencepiece_backend(folder, config, special_map)
    else:
        raise CheckpointError(f"{folder} has neither tokenizer.json nor tokenizer.model")
    logger.info("loaded %s tokenizer from %s", type(backend).__name__, folder)
    return Tokenizer(backend, name_or_path=str(folder))


def _sentencepiece_backend(
    folder: Path, config: dict[str, Any], special_map: dict[str, Any]
) -> InternLM2Tokenizer:
    """InternLM2Tokenizer, or the same class with slow-Llama decode rules (Llama-style configs)."""
    class_name = config.get("tokenizer_class") or "LlamaTokenizer"
    if class_name == "InternLM2Tokenizer":
        style = "internlm2"
    elif class_name in _LLAMA_CLASSES:
        # transformers 5 converts these to a tokenizers model with different prefix rules than
        # the slow LlamaTokenizer the checkpoints were used with; reproduce the slow one.
        style = "llama"
        if config.get("legacy") is False:
            logger.warning("%s: legacy=false Llama tokenization is approximated as legacy", folder)
    else:
        raise CheckpointError(
            f"tokenizer_config.json tokenizer_class is {class_name!r}; with only tokenizer.model "
            f"supported are InternLM2Tokenizer and {list(_LLAMA_CLASSES)}"
        )
    added_json = _read_json(folder / "added_tokens.json")
    named: dict[str, Any] = {}
    for name in _NAMED_TOKENS:
        value = _token_content(config.get(name, special_map.get(name)))
        named[name] = value
    if style == "internlm2":
        named = {k: v or _INTERNLM2_DEFAULTS[k] for k, v in named.items()}
    additional = config.get("additional_special_tokens") or special_map.get(
        "additional_special_tokens", []
    )
    specs = _added_token_specs(config, added_json, extra_special=map(_token_content, additional))
    return InternLM2Tokenizer(
        folder / "tokenizer.model",
        added_tokens=specs,
        add_bos_token=bool(config.get("add_bos_token", True)),
        add_eos_token=bool(config.get("add_eos_token", False)),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        style=style,
        **named,
    )


_INTERNLM2_DEFAULTS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "</s>",
}


def _added_token_specs(
    config: dict[str, Any],
    added_json: dict[str, Any],
    *,
    extra_special: Iterable[str | None] = (),
) -> list[AddedTokenSpec]:
    """Added tokens from `added_tokens_decoder` and `added_tokens.json`, by id."""
    specials = {s for s in extra_special if s is not None}
    specs: dict[int, AddedTokenSpec] = {}
    for raw_id, entry in (config.get("added_tokens_decoder") or {}).items():
        content = entry["content"]
        specs[int(raw_id)] = AddedTokenSpec(
            content=content,
            token_id=int(raw_id),
            special=bool(entry.get("special", False)) or content in specials,
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
        )
    known = {spec.content for spec in specs.values()}
    for content, token_id in added_json.items():
        if content not in known:
            specs[int(token_id)] = AddedTokenSpec(content, int(token_id), content in specials)
    return [specs[i] for i in sorted(specs)]


def _hf_added_token(spec: AddedTokenSpec) -> AddedToken:
    return AddedToken(
        spec.content, special=spec.special, lstrip=spec.lstrip, rstrip=spec.rstrip, normalized=False
    )


def _token_content(value: Any) -> str | None:
    """A named token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"tokenizer config token value {value!r} is neither a string nor a dict")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}; expected a JSON object")
    return data
