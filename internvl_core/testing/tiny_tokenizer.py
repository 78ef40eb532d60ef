"""Tiny tokenizer files for test checkpoints, laid out the way each LLM family's repo ships them.

Byte-level BPE (`tokenizer.json`) for Qwen2 / Phi-3 / Llama-3, a sentencepiece `tokenizer.model` for
InternLM2; both trained in code on a built-in corpus, deterministically, then the InternVL tokens.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

Family = Literal["qwen2", "internlm2", "phi3", "llama"]

# Added by InternVL fine-tuning, in this order, after the base vocabulary (spec section 4).
INTERNVL_TOKENS = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Please describe the image shortly.",
    "What is in the picture? There is a cat sitting on a red chair.",
    "A man is riding a bicycle down the street, and two dogs follow him.",
    "The answer is 42. Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "You are an AI assistant whose name is InternVL.",
    "Hello world! How are you today? I'm fine, thanks.",
    "user\nassistant\nsystem\n",
    "Describe this video in detail. The frames show a sunny beach.",
    "def main():\n    return 'hello'  # code with    spaces\n",
    "Detect the <ref>cat</ref> and give its box.",
    "你好，世界。这是一个测试。",
    "图片里有一只猫坐在红色的椅子上。",
    "请详细描述这张图片。",
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL，是一个有用无害的人工智能助手。",
    "今天天气很好，我们去公园散步吧。",
    "这张图片中有两个人和一辆自行车。",
)

# Pre-tokenizer split in the style of Qwen2 / Llama-3 (words, single digits, punctuation runs).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True, slots=True)
class TinyTokenizerSpec:
    """What the config writer needs to know about the tokenizer it just wrote."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int | None
    token_ids: dict[str, int]


@dataclass(frozen=True, slots=True)
class _Layout:
    """Family-specific token layout: specials in front of / after the trained vocab."""

    front: tuple[str, ...]
    appended: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    tokenizer_class: str
    clean_up_tokenization_spaces: bool
    add_bos_token: bool | None


_LAYOUTS: dict[str, _Layout] = {
    # Qwen2-0.5B-Instruct (InternVL2-1B): no bos, eos <|im_end|>, pad <|endoftext|>.
    "qwen2": _Layout(
        front=(),
        appended=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        tokenizer_class="Qwen2Tokenizer",
        clean_up_tokenization_spaces=False,
        add_bos_token=None,
    ),
    # Phi-3-mini-128k-instruct: <unk> <s> </s> at 0..2, chat tokens at 32000.. with placeholders.
    "phi3": _Layout(
        front=("<unk>", "<s>", "</s>"),
        appended=(
            "<|endoftext|>",
            "<|assistant|>",
            "<|placeholder1|>",
            "<|placeholder2|>",
            "<|placeholder3|>",
            "<|placeholder4|>",
            "<|system|>",
            "<|end|>",
            "<|placeholder5|>",
            "<|placeholder6|>",
            "<|user|>",
        ),
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        unk="<unk>",
        tokenizer_class="LlamaTokenizer",
        clean_up_tokenization_spaces=False,
        add_bos_token=True,
    ),
    # Hermes-2-Theta-Llama-3-70B (InternVL2-Llama3-76B): Llama-3 specials, ChatML tokens.
    "llama": _Layout(
        front=(),
        appended=("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"),
        bos="<|begin_of_text|>",
        eos="<|im_end|>",
        pad="<|end_of_text|>",
        unk=None,
        tokenizer_class="PreTrainedTokenizerFast",
        clean_up_tokenization_spaces=True,
        add_bos_token=None,
    ),
    # InternLM2: sentencepiece <unk> <s> </s> = 0, 1, 2; chat tokens follow the sp vocab.
    "internlm2": _Layout(
        front=("<unk>", "<s>", "</s>"),
        appended=(
            "<|plugin|>",
            "<|interpreter|>",
            "<|action_end|>",
            "<|action_start|>",
            "<|im_end|>",
            "<|im_start|>",
        ),
        bos="<s>",
        eos="</s>",
        pad="</s>",
        unk="<unk>",
        tokenizer_class="InternLM2Tokenizer",
        clean_up_tokenization_spaces=False,
        add_bos_token=True,
    ),
}

BPE_VOCAB_SIZE = 400
SENTENCEPIECE_VOCAB_SIZE = 480


def write_tiny_tokenizer(out_dir: str | Path, family: Family) -> TinyTokenizerSpec:
    """Train the family's tiny tokenizer and write its files into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = _LAYOUTS[family]
    if family == "internlm2":
        base_size = _write_sentencepiece(out)
    else:
        base_size = _write_bpe(out, family, layout)
    extra = (*layout.appended, *INTERNVL_TOKENS)
    token_ids = {tok: i for i, tok in enumerate(layout.front)}
    token_ids.update({tok: base_size + i for i, tok in enumerate(extra)})
    _write_configs(out, family, layout, token_ids)
    return TinyTokenizerSpec(
        vocab_size=base_size + len(extra),
        bos_token_id=token_ids[layout.bos] if layout.bos else None,
        eos_token_id=token_ids[layout.eos],
        pad_token_id=token_ids[layout.pad] if layout.pad else None,
        token_ids=token_ids,
    )


def _write_sentencepiece(out: Path) -> int:
    """Train a byte-fallback BPE sentencepiece model (<unk>=0, <s>=1, </s>=2); returns its size."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=SENTENCEPIECE_VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=0.995,
        split_digits=True,
        # InternLM2 keeps runs of spaces (code indentation) and does no unicode normalisation.
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    proto = buffer.getvalue()
    (out / "tokenizer.model").write_bytes(proto)
    return spm.SentencePieceProcessor(model_proto=proto).get_piece_size()


def _write_bpe(out: Path, family: Family, layout: _Layout) -> int:
    """Train a byte-level BPE `tokenizer.json`; returns the size before the appended tokens."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in layout.front],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    base_size = tokenizer.get_vocab_size()
    extra = (*layout.appended, *INTERNVL_TOKENS)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    if layout.bos is not None:
        bos_id = tokenizer.token_to_id(layout.bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{layout.bos} $A",
            pair=f"{layout.bos} $A {layout.bos} $B",
            special_tokens=[(layout.bos, bos_id)],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    return base_size


def _added_token_entry(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _write_configs(out: Path, family: Family, layout: _Layout, token_ids: dict[str, int]) -> None:
    """`tokenizer_config.json` + `special_tokens_map.json` (+ `added_tokens.json` for InternLM2)."""
    additional = [t for t in (*layout.appended, *INTERNVL_TOKENS) if t not in _named(layout)]
    config: dict[str, Any] = {
        "added_tokens_decoder": {
            str(i): _added_token_entry(tok) for tok, i in sorted(token_ids.items(), key=_by_id)
        },
        "additional_special_tokens": additional,
        "bos_token": layout.bos,
        "clean_up_tokenization_spaces": layout.clean_up_tokenization_spaces,
        "eos_token": layout.eos,
        "model_max_length": 32768,
        "pad_token": layout.pad,
        "tokenizer_class": layout.tokenizer_class,
        "unk_token": layout.unk,
    }
    if layout.add_bos_token is not None:
        config["add_bos_token"] = layout.add_bos_token
        config["add_eos_token"] = False
    if family == "internlm2":
        config["auto_map"] = {
            "AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None],
        }
        added = {tok: i for tok, i in token_ids.items() if tok not in layout.front}
        (out / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    if family == "qwen2":
        config["errors"] = "replace"
        config["split_special_tokens"] = False
    special_map: dict[str, Any] = {
        name: value
        for name, value in (
            ("bos_token", layout.bos),
            ("eos_token", layout.eos),
            ("pad_token", layout.pad),
            ("unk_token", layout.unk),
        )
        if value is not None
    }
    special_map["additional_special_tokens"] = additional
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def _named(layout: _Layout) -> set[str]:
    return {t for t in (layout.bos, layout.eos, layout.pad, layout.unk) if t is not None}


def _by_id(item: tuple[str, int]) -> int:
    return item[1]
