"""Tests for engine/detokenizer.py: deltas concatenate to `decode(ids)`, held-back UTF-8, cost."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from internvl_core.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好。",
    "图片里有一只猫和一只狗，它们在草地上玩耍。",
    "Describe the image in detail, please.",
    "书生多模态大模型，英文名叫InternVL，是一个有用无害的人工智能助手。",
    "Numbers: 12345, emoji 😀🎉 and café naïve résumé.",
    "  leading spaces, tabs\tand\nnew lines  ",
]
SNIPPETS = [*CORPUS, "龘靐齉", "🦙🐉", " the", "猫", "\n\n", "ü", "<|im_end|>"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]


def _byte_level() -> PreTrainedTokenizerFast:
    """Qwen2-style byte-level BPE: every byte is a token, Chinese characters often split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=SPECIALS)


def _sentencepiece_style() -> PreTrainedTokenizerFast:
    """Llama/Phi-3-style: `▁` word prefix, byte fallback `<0xXX>` tokens, one leading space
    stripped on decode."""
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    base = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base.train_from_iterator(CORPUS * 10, trainer)
    vocab = base.get_vocab()
    merges = [tuple(m) for m in json.loads(base.to_str())["model"]["merges"]]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    extra = ["<|im_end|>", "<|end|>", "<img>", "<IMG_CONTEXT>"]
    tok.add_special_tokens(extra)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=extra,
    )


TOKENIZERS = {"byte_level": _byte_level, "sentencepiece_style": _sentencepiece_style}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return TOKENIZERS[request.param]()


def _random_ids(tok: PreTrainedTokenizerFast, seed: int, length: int = 40) -> list[int]:
    """Uniform ids (bytes, merges, specials) for even seeds; encoded text with spliced special
    and byte tokens for odd seeds."""
    rng = random.Random(seed)
    vocab_size = len(tok)
    if seed % 2 == 0:
        return [rng.randrange(vocab_size) for _ in range(length)]
    ids: list[int] = []
    specials = list(tok.all_special_ids)
    while len(ids) < length:
        ids.extend(tok.encode(rng.choice(SNIPPETS), add_special_tokens=False))
        if rng.random() < 0.3:
            ids.append(rng.choice(specials))
        if rng.random() < 0.2:
            ids.append(rng.randrange(vocab_size))
    return ids[:length]


def _stream(tok: PreTrainedTokenizerFast, ids: Sequence[int], *, skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, [1, 2, 3], skip_special_tokens=skip)
    deltas = [detok.append(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas


@pytest.mark.parametrize("skip", [True, False])
def test_deltas_concatenate_to_decode(tokenizer: PreTrainedTokenizerFast, skip: bool) -> None:
    for seed in range(200):
        ids = _random_ids(tokenizer, seed)
        deltas = _stream(tokenizer, ids, skip=skip)
        expected = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == expected, (seed, ids)
        # Prefix property: after each step the text so far is a prefix of the final decode.
        assert all(expected.startswith("".join(deltas[: i + 1])) for i in range(len(deltas)))


def test_split_character_is_held_back_until_complete(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "猫🦙龘 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()) + 3  # characters really are split over byte tokens
    deltas = _stream(tokenizer, ids, skip=True)
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert "" in deltas  # at least one step held back


def test_invalid_bytes_at_end_are_released_by_flush(tokenizer: PreTrainedTokenizerFast) -> None:
    # "龘" is not in the corpus: byte tokens; keep all but the last byte.
    ids = tokenizer.encode("ok 龘", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    deltas = [detok.append(t) for t in ids]
    assert REPLACEMENT_CHAR not in "".join(deltas)
    assert detok.has_pending
    assert detok.flush().endswith(REPLACEMENT_CHAR)
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert detok.flush() == ""


def test_special_tokens_skipped_like_decode(tokenizer: PreTrainedTokenizerFast) -> None:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Hello there", add_special_tokens=False)
    ids = [*ids[:1], im_end, *ids[1:], im_end]
    skipped = _stream(tokenizer, ids, skip=True)
    kept = _stream(tokenizer, ids, skip=False)
    assert "".join(skipped) == tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in "".join(skipped)
    assert "".join(kept) == tokenizer.decode(ids, skip_special_tokens=False)
    assert "".join(kept).endswith("<|im_end|>")


class _CountingDecoder:
    """Forwards to a real tokenizer and records how many ids each decode call received."""

    def __init__(self, tok: PreTrainedTokenizerFast) -> None:
        self.tok = tok
        self.lengths: list[int] = []

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self.tok.convert_ids_to_tokens(list(ids))


def test_each_step_decodes_a_short_window(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode(" ".join(CORPUS * 10), add_special_tokens=False)
    assert len(ids) > 300
    counter = _CountingDecoder(tokenizer)
    detok = IncrementalDetokenizer(counter, [], skip_special_tokens=True)
    for t in ids:
        detok.append(t)
    detok.flush()
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(counter.lengths) <= 24
    assert sum(counter.lengths) / len(counter.lengths) <= 10
    assert len(counter.lengths) <= 2 * len(ids)


def test_space_after_skipped_special_is_kept(tokenizer: PreTrainedTokenizerFast) -> None:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    world = tokenizer.encode(" world", add_special_tokens=False)
    ids = [*hello, im_end, im_end, *world]
    deltas = _stream(tokenizer, ids, skip=True)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas).endswith(" world")


@pytest.mark.parametrize("family", ["qwen2", "internlm2", "phi3", "llama"])
@pytest.mark.parametrize("skip", [True, False])
def test_project_tokenizers_deltas_concatenate_to_decode(
    request: pytest.FixtureRequest, family: str, skip: bool
) -> None:
    from internvl_core.tokenizer.loader import load_tokenizer

    tok = load_tokenizer(request.getfixturevalue(f"tiny_{family}"))
    # Known gap (see IncrementalDetokenizer): unskipped <unk>/<s>/</s> pieces make the slow
    # InternLM2 decode insert a space before the preceding text run, which a stream cannot do.
    excluded = {0, 1, 2} if family == "internlm2" and not skip else set()
    for seed in range(200):
        ids = [t for t in _random_ids(tok, seed) if t not in excluded]  # type: ignore[arg-type]
        deltas = _stream(tok, ids, skip=skip)  # type: ignore[arg-type]
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), (family, seed, ids)


def test_spaces_between_special_tokens_off_reaches_the_decoder(tiny_internlm2: object) -> None:
    """vLLM's request flag: the slow InternLM2 decode then joins added tokens without spaces."""
    from internvl_core.tokenizer.loader import load_tokenizer

    tok = load_tokenizer(tiny_internlm2)  # type: ignore[arg-type]
    im_end = tok.token_to_id("<|im_end|>")
    ids = [*tok.encode("Hello world", add_special_tokens=False), im_end, im_end]
    for spaces in (True, False):
        detok = IncrementalDetokenizer(
            tok, [], skip_special_tokens=False, spaces_between_special_tokens=spaces
        )
        text = "".join(detok.append(t) for t in ids) + detok.flush()
        assert text == tok.decode(
            ids, skip_special_tokens=False, spaces_between_special_tokens=spaces
        )
        assert ("world <|im_end|> <|im_end|>" in text) == spaces
