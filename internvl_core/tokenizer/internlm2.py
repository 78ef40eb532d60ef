"""Sentencepiece tokenizer with the original InternLM2 (and slow Llama) id and text semantics.

Text -> ids: split on added tokens, `sp.encode` each piece between them, prepend `<s>`.
Ids -> text: `sp.decode` on runs of normal pieces, added tokens spliced in as the original does.
"""

# follows https://huggingface.co/internlm/internlm2-chat-7b/blob/main/tokenization_internlm2.py
# (run on transformers 4.37's PreTrainedTokenizer, which InternVL2 pins)

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import sentencepiece as spm

from internvl_core.errors import CheckpointError, InvalidRequestError

SentencePieceStyle = Literal["internlm2", "llama"]

# transformers' `clean_up_tokenization`: the original InternLM2 decode applies it unconditionally.
_CLEANUP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """Remove the space before punctuation and English contractions (transformers' rule)."""
    for old, new in _CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


@dataclass(frozen=True, slots=True)
class AddedTokenSpec:
    """A token kept whole on encode (`added_tokens_decoder` / `added_tokens.json` entry)."""

    content: str
    token_id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


class InternLM2Tokenizer:
    """`tokenizer.model` + added tokens, reproducing the slow tokenizer of the checkpoint.

    `style="internlm2"` is `tokenization_internlm2.InternLM2Tokenizer`; `style="llama"` is the
    slow `LlamaTokenizer` with `legacy=True` (Yi), which differs only in decode spacing.
    """

    def __init__(
        self,
        model_file: str | Path,
        *,
        added_tokens: Iterable[AddedTokenSpec] = (),
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = "</s>",
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        style: SentencePieceStyle = "internlm2",
    ) -> None:
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.sp_size = self._sp.get_piece_size()
        self.style = style
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._added: dict[str, AddedTokenSpec] = {t.content: t for t in added_tokens}
        named = [t for t in (bos_token, eos_token, unk_token, pad_token) if t is not None]
        for token in named:
            # transformers registers named special tokens as added tokens (at their sp id).
            if token not in self._added:
                self._added[token] = AddedTokenSpec(token, self._named_id(token))
        self._by_id = {spec.token_id: spec for spec in self._added.values()}
        self.named_ids = frozenset(self._added[t].token_id for t in named)
        self.bos_token_id = self._added[bos_token].token_id if bos_token else None
        self.eos_token_id = self._added[eos_token].token_id if eos_token else None
        self.vocab_size = max(self.sp_size, max(self._by_id, default=-1) + 1)
        self.special_ids = self.named_ids | {s.token_id for s in self._added.values() if s.special}
        # Longest first, so the leftmost match is also the longest (as transformers' trie).
        contents = sorted(self._added, key=len, reverse=True)
        alternatives = "|".join(map(re.escape, contents)) or r"(?!x)x"
        self._split_pattern = re.compile(f"({alternatives})")

    def _named_id(self, token: str) -> int:
        token_id = self._sp.piece_to_id(token)
        if self._sp.id_to_piece(token_id) != token:
            raise CheckpointError(
                f"special token {token!r} is neither in tokenizer.model nor in the added tokens"
            )
        return token_id

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; with `add_special_tokens`, `<s>` first when add_bos_token."""
        parts = self._split_pattern.split(text)  # [text, added, text, added, ..., text]
        texts, added = parts[0::2], parts[1::2]
        for i, content in enumerate(added):
            spec = self._added[content]
            if spec.rstrip:
                texts[i + 1] = texts[i + 1].lstrip()
            if spec.lstrip:
                texts[i] = texts[i].rstrip()
        ids: list[int] = []
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        for i, chunk in enumerate(texts):
            if chunk:
                # Each stretch between added tokens is encoded on its own (dummy prefix each time).
                ids.extend(self._sp.encode(chunk))
            if i < len(added):
                ids.append(self._added[added[i]].token_id)
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def token_to_id(self, token: str) -> int | None:
        """Id of a piece or added token; None when the vocabulary lacks it."""
        if token in self._added:
            return self._added[token].token_id
        token_id = self._sp.piece_to_id(token)
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Pieces (`▁the`, `<0x0A>`) or added-token contents."""
        tokens: list[str] = []
        for token_id in ids:
            spec = self._by_id.get(token_id)
            if spec is not None:
                tokens.append(spec.content)
            elif 0 <= token_id < self.sp_size:
                tokens.append(self._sp.id_to_piece(token_id))
            else:
                raise InvalidRequestError(
                    f"token id {token_id} is out of range; vocab_size is {self.vocab_size}"
                )
        return tokens

    def decode(
        self,
        ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        special_ids: frozenset[int] | None = None,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        """Text of `ids` as the original slow tokenizer's `decode` gives it.

        `special_ids` overrides which ids count as special (the demo's kept grounding tags).
        `spaces_between_special_tokens` (transformers' slow `_decode` flag, vLLM's request field)
        joins the text runs and the spliced added tokens with spaces (on) or nothing (off).
        """
        special_ids = self.special_ids if special_ids is None else special_ids
        if skip_special_tokens:
            ids = [i for i in ids if i not in special_ids]
        specials = frozenset(self.convert_ids_to_tokens(sorted(special_ids)))
        # Added tokens decoded apart from sentencepiece ("legacy" added tokens in transformers).
        spliced = {
            spec.content
            for spec in self._added.values()
            if spec.token_id not in special_ids
            or (spec.token_id >= self.sp_size and spec.token_id not in self.named_ids)
        }
        sub_texts: list[str] = []
        run: list[str] = []
        for token in self.convert_ids_to_tokens(ids):
            if token not in spliced:
                run.append(token)
                continue
            if run:
                text = self.convert_tokens_to_string(run, special_tokens=specials)
                if text:
                    sub_texts.append(text)
                run = []
            sub_texts.append(token)
        if run:
            sub_texts.append(self.convert_tokens_to_string(run, special_tokens=specials))
        # transformers 4.37 joins with spaces_between_special_tokens=True by default.
        text = (" " if spaces_between_special_tokens else "").join(sub_texts)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def convert_tokens_to_string(
        self, tokens: Sequence[str], *, special_tokens: frozenset[str] | None = None
    ) -> str:
        """Pieces to text: `sp.decode` on runs, special tokens inserted as text."""
        if special_tokens is None:
            special_tokens = frozenset(self.convert_ids_to_tokens(sorted(self.special_ids)))
        if self.style == "llama" and tokens and tokens[0].startswith("▁"):
            # The slow Llama tokenizer strips the first piece's word marker by hand.
            tokens = [tokens[0][1:], *tokens[1:]]
        out = ""
        run: list[str] = []
        prev_is_special = False
        for i, token in enumerate(tokens):
            if token not in special_tokens:
                run.append(token)
                prev_is_special = False
                continue
            # Both originals put a space before a special token that follows normal text;
            # the Llama one never at position 0, InternLM2's always (then drops 1 char below).
            if not prev_is_special and (self.style == "internlm2" or i != 0):
                out += " "
            out += self._sp.decode(run) + token
            run = []
            prev_is_special = True
        out += self._sp.decode(run)
        if self.style == "llama":
            return out
        out = clean_up_tokenization(out)
        # The original's `_maybe_add_prefix_space` always prepends " " for non-empty input
        # (it compares a piece with a set of ids), then `[1:]` drops the first character.
        if tokens:
            out = " " + out
        return out[1:]
