"""Tokenizer loading without remote code: ids, special tokens, bos rules and decode quirks."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import AddedToken
from tokenizers import Tokenizer as RawTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from internvl_core.errors import CheckpointError, InvalidRequestError
from internvl_core.testing import INTERNVL_TOKENS, write_tiny_tokenizer
from internvl_core.tokenizer import AddedTokenSpec, InternLM2Tokenizer, Tokenizer, load_tokenizer

FAMILIES = ("qwen2", "internlm2", "phi3", "llama")
TEXTS = (
    "Describe the image in detail.",
    "你好，世界。这是一个测试。",
    "def main():\n    return 'hello'\n\nTabs\tand  double  spaces",
    "Mixed 中文 and English 123 ünïcødé ✓ 🙂",
)
STOP_TOKEN = {"qwen2": "<|im_end|>", "internlm2": "<|im_end|>", "llama": "<|im_end|>"}
BOS = {"internlm2": "<s>", "phi3": "<s>", "llama": "<|begin_of_text|>"}
GROUNDING = ["<ref>", "</ref>", "<box>", "</box>"]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    for family in FAMILIES:
        write_tiny_tokenizer(root / family, family)  # type: ignore[arg-type]
    return {family: root / family for family in FAMILIES}


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dirs: dict[str, Path]) -> dict[str, Tokenizer]:
    return {family: load_tokenizer(path) for family, path in tokenizer_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizers: dict[str, Tokenizer], family: str, text: str) -> None:
    tok = tokenizers[family]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False).endswith(text)
    assert all(0 <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_only_where_the_checkpoint_adds_it(
    tokenizers: dict[str, Tokenizer], family: str
) -> None:
    tok = tokenizers[family]
    with_bos = tok.encode("Hello world")
    without = tok.encode("Hello world", add_special_tokens=False)
    if family == "qwen2":
        assert tok.bos_token_id is None
        assert with_bos == without
    else:
        assert tok.bos_token_id == tok.token_to_id(BOS[family])
        assert with_bos == [tok.bos_token_id, *without]
        assert tok.bos_token_id in tok.all_special_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_internvl_and_chat_tokens_kept_whole(
    tokenizers: dict[str, Tokenizer], tokenizer_dirs: dict[str, Path], family: str
) -> None:
    tok = tokenizers[family]
    config = json.loads((tokenizer_dirs[family] / "tokenizer_config.json").read_text())
    by_content = {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()}
    context_id = tok.token_to_id("<IMG_CONTEXT>")
    assert context_id == by_content["<IMG_CONTEXT>"]
    # The InternVL tokens are the last nine ids, in training order.
    ids = [tok.token_to_id(t) for t in INTERNVL_TOKENS]
    assert ids == list(range(tok.vocab_size - 9, tok.vocab_size))
    prompt = "<img>" + "<IMG_CONTEXT>" * 3 + "</img>\nWhat is this?"
    encoded = tok.encode(prompt, add_special_tokens=False)
    assert encoded[:5] == [ids[0], context_id, context_id, context_id, ids[1]]
    assert encoded.count(context_id) == 3
    stop = STOP_TOKEN.get(family, "<|end|>")
    stop_id = tok.token_to_id(stop)
    assert stop_id == by_content[stop]
    assert tok.encode(f"answer{stop}", add_special_tokens=False)[-1] == stop_id
    assert tok.convert_ids_to_tokens([stop_id, context_id]) == [stop, "<IMG_CONTEXT>"]
    assert tok.token_to_id("<not-a-token>") is None


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_special_tokens_and_kept_grounding_tags(
    tokenizers: dict[str, Tokenizer], family: str
) -> None:
    tok = tokenizers[family]
    stop = STOP_TOKEN.get(family, "<|end|>")
    body = tok.encode("The cat", add_special_tokens=False)
    ref, ref_end, box, box_end = (tok.token_to_id(t) for t in GROUNDING)
    coords = tok.encode("[[1, 2, 3, 4]]", add_special_tokens=False)
    ids = [ref, *body, ref_end, box, *coords, box_end, tok.token_to_id(stop)]
    assert tok.decode(ids) == tok.decode([*body, *coords])
    kept = tok.with_kept_special_tokens(GROUNDING)
    assert kept.all_special_ids == tok.all_special_ids - {ref, ref_end, box, box_end}
    text = kept.decode(ids)
    for tag in GROUNDING:
        assert text.count(tag) == 1
    assert stop not in text
    assert tok.batch_decode([ids, body]) == [tok.decode(ids), tok.decode(body)]
    # The original object is unchanged.
    assert "<ref>" not in tok.decode(ids)


@pytest.mark.parametrize("family", ["qwen2", "phi3", "llama"])
def test_fast_encode_matches_the_raw_tokenizers_library(
    tokenizers: dict[str, Tokenizer], tokenizer_dirs: dict[str, Path], family: str
) -> None:
    raw = RawTokenizer.from_file(str(tokenizer_dirs[family] / "tokenizer.json"))
    tok = tokenizers[family]
    for text in (*TEXTS, "<|im_start|>user\n<img><IMG_CONTEXT></img>\nHi<|im_end|>"):
        assert tok.encode(text) == raw.encode(text).ids
        assert (
            tok.encode(text, add_special_tokens=False)
            == raw.encode(text, add_special_tokens=False).ids
        )
        assert tok.decode(raw.encode(text).ids, skip_special_tokens=False) == raw.decode(
            raw.encode(text).ids, skip_special_tokens=False
        ).replace(" ,", ",")


def test_llama3_decode_applies_the_original_cleanup(tokenizers: dict[str, Tokenizer]) -> None:
    # Llama-3 configs say clean_up_tokenization_spaces=true, which transformers 4.x applied.
    assert tokenizers["llama"].decode(tokenizers["llama"].encode("Hi , you !")) == "Hi, you!"
    assert tokenizers["qwen2"].decode(tokenizers["qwen2"].encode("Hi , you !")) == "Hi , you !"


def _sentencepiece_reference(folder: Path) -> SentencePieceBackend:
    """transformers' own sentencepiece tokenizer on the same model file and added tokens."""
    ref = SentencePieceBackend(
        vocab_file=str(folder / "tokenizer.model"),
        legacy=True,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    added = json.loads((folder / "added_tokens.json").read_text())
    for content in sorted(added, key=added.__getitem__):
        ref.add_tokens([AddedToken(content, special=True, normalized=False)])
    return ref


def test_internlm2_ids_match_transformers_sentencepiece(
    tokenizers: dict[str, Tokenizer], tokenizer_dirs: dict[str, Path]
) -> None:
    tok = tokenizers["internlm2"]
    ref = _sentencepiece_reference(tokenizer_dirs["internlm2"])
    prompt = (
        "<|im_start|>system\n你是书生。<|im_end|><|im_start|>user\n<img>"
        + "<IMG_CONTEXT>" * 4
        + "</img>\nDescribe  it.<|im_end|><|im_start|>assistant\n"
    )
    for text in (*TEXTS, prompt, " leading space", "<s>literal bos</s>", ""):
        ours = tok.encode(text, add_special_tokens=False)
        assert ours == ref.encode(text, add_special_tokens=False), text
        assert tok.encode(text) == [1, *ours]


def test_internlm2_matches_plain_sentencepiece(tokenizer_dirs: dict[str, Path]) -> None:
    folder = tokenizer_dirs["internlm2"]
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = load_tokenizer(folder)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    for text in TEXTS:
        assert tok.encode(text) == [1, *sp.encode(text)]
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    # Added tokens split the text; each stretch is encoded on its own (dummy prefix each time).
    im_start = tok.token_to_id("<|im_start|>")
    expected = [1, im_start, *sp.encode("user\nHi"), im_start, *sp.encode("assistant\n")]
    assert tok.encode("<|im_start|>user\nHi<|im_start|>assistant\n") == expected
    # Byte fallback: a character outside the tiny vocab becomes byte pieces and decodes back.
    ids = tok.encode("🙂", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert tok.decode(ids) == "🙂"


def test_internlm2_decode_quirks_of_the_original(tokenizers: dict[str, Tokenizer]) -> None:
    tok = tokenizers["internlm2"]
    hello = tok.encode("Hello world", add_special_tokens=False)
    im_end = tok.token_to_id("<|im_end|>")
    context = tok.token_to_id("<IMG_CONTEXT>")
    # clean_up_tokenization is applied by the original convert_tokens_to_string.
    assert tok.decode(tok.encode("Hi , you ! I 'm")) == "Hi, you! I'm"
    # <s> (inside the sp vocab) goes through convert_tokens_to_string: a space before it.
    assert tok.decode([1, *hello], skip_special_tokens=False) == " <s>Hello world"
    # Added tokens beyond the sp vocab are joined with spaces (spaces_between_special_tokens).
    assert tok.decode([*hello, im_end], skip_special_tokens=False) == "Hello world <|im_end|>"
    assert tok.decode([context, context], skip_special_tokens=False) == (
        "<IMG_CONTEXT> <IMG_CONTEXT>"
    )
    assert tok.decode([*hello, im_end]) == "Hello world"
    # vLLM's / transformers' spaces_between_special_tokens=False joins them with nothing.
    joined = tok.decode(
        [*hello, im_end], skip_special_tokens=False, spaces_between_special_tokens=False
    )
    assert joined == "Hello world<|im_end|>"
    tokens = tok.convert_ids_to_tokens(hello)
    assert tok.convert_tokens_to_string(tokens) == "Hello world"


def _in_vocab_chat_tokens(tmp_path: Path) -> InternLM2Tokenizer:
    """InternLM2's real layout: <|im_end|> / <|im_start|> are sentencepiece pieces (< sp size)."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 4),
        model_writer=buffer,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=["<|im_end|>", "<|im_start|>"],
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(buffer.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    size = sp.get_piece_size()
    added = [AddedTokenSpec(t, sp.piece_to_id(t)) for t in ("<|im_end|>", "<|im_start|>")]
    added += [AddedTokenSpec(t, size + i) for i, t in enumerate(INTERNVL_TOKENS)]
    return InternLM2Tokenizer(tmp_path / "tokenizer.model", added_tokens=added)


def test_internlm2_in_vocab_special_tokens(tmp_path: Path) -> None:
    tok = _in_vocab_chat_tokens(tmp_path)
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end is not None and im_end < tok.sp_size
    assert tok.vocab_size == tok.sp_size + len(INTERNVL_TOKENS)
    hi = tok.encode("Hi", add_special_tokens=False)
    assert tok.encode("Hi<|im_end|>") == [1, *hi, im_end]
    # An in-vocab special token goes through convert_tokens_to_string: one space before it.
    assert tok.decode([*hi, im_end, *hi], skip_special_tokens=False) == " Hi<|im_end|>Hi"
    assert tok.decode([*hi, im_end, *hi]) == "Hi Hi"


def test_llama_style_sentencepiece_config(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "yi"
    shutil.copytree(tokenizer_dirs["internlm2"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="LlamaTokenizer", add_bos_token=False)
    del config["auto_map"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    hello = tok.encode("Hello world")
    assert hello == tok.encode("Hello world", add_special_tokens=False)
    # Slow Llama decode: no space before a special token at position 0, no cleanup.
    assert tok.decode([1, *hello], skip_special_tokens=False) == "<s>Hello world"
    assert tok.decode(tok.encode("Hi , you")) == "Hi , you"


def test_errors_name_the_problem(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"neither tokenizer\.json nor tokenizer\.model"):
        load_tokenizer(tmp_path)
    folder = tmp_path / "odd"
    shutil.copytree(tokenizer_dirs["internlm2"], folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(CheckpointError, match="T5Tokenizer"):
        load_tokenizer(folder)
    tok = load_tokenizer(tokenizer_dirs["qwen2"])
    with pytest.raises(InvalidRequestError, match="vocab_size is 412"):
        tok.convert_ids_to_tokens([100000])
