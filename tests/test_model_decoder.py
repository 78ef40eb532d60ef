"""DecoderModel vs the transformers decoders (Qwen2, Llama/Yi, InternLM2 as Llama, Phi-3 longrope).

Each test builds a seeded random transformers model, exports it in the ORIGINAL InternVL checkpoint
layout (written here, independently of weights.py), loads it through `DecoderModel.from_checkpoint`
and compares prefill logits and greedy tokens over our paged KV cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from internvl_core.errors import CheckpointError
from internvl_core.model.attention_metadata import AttentionMetadata
from internvl_core.model.decoder import DecoderModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 64, 4, 2, 16, 128, 512
BLOCK_SIZE = 16
ORIGINAL_MAX = 4096
HALF = HEAD_DIM // 2
SHORT = [1.0 + 0.1 * i for i in range(HALF)]
LONG = [1.0 + 2.5 * i for i in range(HALF)]
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "llama3": "LlamaForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def _llm_raw(case: str, num_layers: int, *, tie: bool = False) -> dict:
    """`llm_config` of an original InternVL config.json."""
    raw = {
        "architectures": [ARCHITECTURES[case]],
        "hidden_size": HIDDEN,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": INTER,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": ORIGINAL_MAX,
        "tie_word_embeddings": tie,
    }
    if case == "internlm2":
        raw.update(bias=False, rope_scaling={"type": "dynamic", "factor": 2.0})
    elif case == "llama":
        raw["rope_theta"] = 5e6  # Yi-34B
    elif case == "llama3":
        raw["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        }
    elif case == "phi3":
        raw.update(
            num_key_value_heads=HEADS,
            rope_theta=10000.0,
            max_position_embeddings=131072,
            original_max_position_embeddings=ORIGINAL_MAX,
            rope_scaling={"type": "su", "short_factor": SHORT, "long_factor": LONG},
        )
    return raw


def _hf_model(case: str, raw: dict) -> torch.nn.Module:
    common = {
        "hidden_size": HIDDEN,
        "num_hidden_layers": raw["num_hidden_layers"],
        "num_attention_heads": HEADS,
        "num_key_value_heads": raw["num_key_value_heads"],
        "intermediate_size": INTER,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": raw["max_position_embeddings"],
        "tie_word_embeddings": raw["tie_word_embeddings"],
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
        "attn_implementation": "sdpa",
    }
    rope = {"rope_type": "default", "rope_theta": raw["rope_theta"]}
    torch.manual_seed(0)
    if case == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_parameters=rope))
    elif case == "phi3":
        longrope = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}
        longrope["original_max_position_embeddings"] = ORIGINAL_MAX
        config = Phi3Config(
            **common,
            original_max_position_embeddings=ORIGINAL_MAX,
            rope_parameters={**rope, **longrope},
        )
        model = Phi3ForCausalLM(config)
    else:
        # InternLM2's dynamic NTK is the default RoPE at or below max_position_embeddings.
        if case == "llama3":
            rope = {"rope_theta": raw["rope_theta"], **raw["rope_scaling"]}
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(0.08 * noise)
    return model.eval()


def _internlm2_state(hf_state: dict[str, torch.Tensor], num_layers: int) -> dict:
    """HF Llama names -> original InternLM2 names, packing q/k/v per kv group into `wqkv`."""
    group = HEADS // KV_HEADS
    state = {
        "model.tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
        "model.norm.weight": hf_state["model.norm.weight"],
    }
    if "lm_head.weight" in hf_state:
        state["output.weight"] = hf_state["lm_head.weight"]
    for i in range(num_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        q = hf_state[src + "self_attn.q_proj.weight"]  # [H*d, D]
        k = hf_state[src + "self_attn.k_proj.weight"]  # [K*d, D]
        v = hf_state[src + "self_attn.v_proj.weight"]  # [K*d, D]
        blocks = []
        for g in range(KV_HEADS):
            blocks.append(q[g * group * HEAD_DIM : (g + 1) * group * HEAD_DIM])
            blocks.append(k[g * HEAD_DIM : (g + 1) * HEAD_DIM])
            blocks.append(v[g * HEAD_DIM : (g + 1) * HEAD_DIM])
        state[dst + "attention.wqkv.weight"] = torch.cat(blocks)  # [(H+2K)*d, D]
        state[dst + "attention.wo.weight"] = hf_state[src + "self_attn.o_proj.weight"]
        state[dst + "feed_forward.w1.weight"] = hf_state[src + "mlp.gate_proj.weight"]
        state[dst + "feed_forward.w3.weight"] = hf_state[src + "mlp.up_proj.weight"]
        state[dst + "feed_forward.w2.weight"] = hf_state[src + "mlp.down_proj.weight"]
        state[dst + "attention_norm.weight"] = hf_state[src + "input_layernorm.weight"]
        state[dst + "ffn_norm.weight"] = hf_state[src + "post_attention_layernorm.weight"]
    # some exports carry the rotary buffer; it must be ignored
    state["model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(HALF)
    return state


def _write_checkpoint(path: Path, case: str, raw: dict, hf: torch.nn.Module) -> Path:
    hf_state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if raw["tie_word_embeddings"]:
        hf_state.pop("lm_head.weight", None)
    if case == "internlm2":
        state = _internlm2_state(hf_state, raw["num_hidden_layers"])
    else:
        # Qwen2 / Llama / Phi-3 originals use the transformers names (Phi-3 fused qkv/gate_up too).
        state = hf_state
    save_file(
        {"language_model." + k: v.contiguous() for k, v in state.items()}, path / "x.safetensors"
    )
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 56,
        "patch_size": 14,
        "norm_type": "layer_norm",
        "qkv_bias": True,
        "qk_normalization": False,
    }
    config = {
        "vision_config": vision,
        "llm_config": raw,
        "template": "Hermes-2",
        "ps_version": "v2",
        "force_image_size": 56,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def _build(tmp_path: Path, case: str, num_layers: int = 2, *, tie: bool = False):
    raw = _llm_raw(case, num_layers, tie=tie)
    hf = _hf_model(case, raw)
    return hf, _write_checkpoint(tmp_path, case, raw, hf)


def _step(
    stages: list[DecoderModel],
    caches: list[list[torch.Tensor]],
    ids: list[int],
    start: int,
    *,
    switch: bool = True,
) -> torch.Tensor:
    """One forward of `ids` at positions start.. through chained stages -> logits [len, V].

    Phi-3: the original per-forward switch, long factors when max(position) + 1 > original max
    (`switch=False` keeps the short ones, to show the tests can tell the difference).
    """
    seq_len = start + len(ids)
    table = list(range(caches[0][0].shape[1]))
    mask = None
    if stages[0].arch.family == "phi3":
        mask = torch.full((len(ids),), switch and seq_len > ORIGINAL_MAX)
    attn = AttentionMetadata.for_contiguous(
        [len(ids)], [seq_len], [table], BLOCK_SIZE, long_rope_mask=mask
    )
    positions = torch.arange(start, seq_len)
    hidden = stages[0].embed_tokens(torch.tensor(ids))  # [T, D]
    for stage, cache in zip(stages, caches, strict=True):
        hidden = stage(hidden, positions, cache, attn)  # [T, D]
    return stages[-1].compute_logits(hidden)  # [T, V]


@torch.inference_mode()
def _our_decode(
    stages: list[DecoderModel],
    prompt: list[int],
    steps: int,
    *,
    forced: list[int] | None = None,
    switch: bool = True,
) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy decoding (or feeding `forced` tokens) -> (logits of every forward, tokens)."""
    num_blocks = -(-(len(prompt) + steps) // BLOCK_SIZE)
    caches = [stage.allocate_kv_caches(num_blocks, BLOCK_SIZE) for stage in stages]
    all_logits = [_step(stages, caches, prompt, 0, switch=switch)]  # [T, V]
    tokens = [int(all_logits[-1][-1].argmax())]
    while len(tokens) < steps:
        fed = forced[len(tokens) - 1] if forced else tokens[-1]
        start = len(prompt) + len(tokens) - 1
        all_logits.append(_step(stages, caches, [fed], start, switch=switch))  # [1, V]
        tokens.append(int(all_logits[-1][-1].argmax()))
    return all_logits, tokens


def _our_greedy(
    stages: list[DecoderModel], prompt: list[int], steps: int
) -> tuple[torch.Tensor, list[int]]:
    """Greedy decoding -> (prefill logits [T, V], tokens)."""
    all_logits, tokens = _our_decode(stages, prompt, steps)
    return all_logits[0], tokens


@torch.inference_mode()
def _hf_generate(hf: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    hf.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=steps,
        pad_token_id=0,
    )
    new = out[0, len(prompt) :].tolist()
    assert len(new) == steps
    return new


def _prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(
        0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


@pytest.mark.parametrize("case", ["qwen2", "internlm2", "llama", "llama3", "phi3"])
def test_family_matches_transformers(tmp_path: Path, case: str) -> None:
    hf, path = _build(tmp_path, case)
    model = DecoderModel.from_checkpoint(path, dtype=torch.float32)
    assert model.arch.family == ("llama" if case == "llama3" else case)
    prompt = _prompt(13)
    ours_prefill, ours_tokens = _our_greedy([model], prompt, 32)
    with torch.inference_mode():
        hf_prefill = hf(torch.tensor([prompt])).logits[0]  # [T, V]
    torch.testing.assert_close(ours_prefill, hf_prefill, atol=1e-4, rtol=1e-4)
    assert ours_tokens == _hf_generate(hf, prompt, 32)
    assert len(set(ours_tokens)) > 1, "degenerate model: greedy test would be weak"


def test_phi3_long_prompt_uses_long_factors(tmp_path: Path) -> None:
    hf, path = _build(tmp_path, "phi3")
    model = DecoderModel.from_checkpoint(path, dtype=torch.float32)
    prompt = _prompt(4200, seed=1)
    ours_prefill, ours_tokens = _our_greedy([model], prompt, 8)
    with torch.inference_mode():
        hf_prefill = hf(torch.tensor([prompt])).logits[0]  # [T, V]
    torch.testing.assert_close(ours_prefill, hf_prefill, atol=1e-4, rtol=1e-4)
    assert ours_tokens == _hf_generate(hf, prompt, 8)


@torch.inference_mode()
def test_phi3_decode_crossing_original_max_switches_per_forward(tmp_path: Path) -> None:
    """Prefill (short factors), then decode steps at positions >= 4096 use the long ones while
    the cached keys keep their short rotation: the original remote code's per-forward rule.

    transformers 5.x `generate` instead recomputes the whole cache at the switch, so the reference
    is driven one forward at a time.
    """
    hf, path = _build(tmp_path, "phi3")
    model = DecoderModel.from_checkpoint(path, dtype=torch.float32)
    prompt = _prompt(4085, seed=2)
    steps = 20
    ours_logits, ours_tokens = _our_decode([model], prompt, steps)
    out = hf(torch.tensor([prompt]), use_cache=True)
    past, hf_tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
    hf_logits = [out.logits[0]]  # [T, V]
    while len(hf_tokens) < steps:
        position = len(prompt) + len(hf_tokens) - 1
        out = hf(
            torch.tensor([hf_tokens[-1:]]),
            position_ids=torch.tensor([[position]]),
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        hf_logits.append(out.logits[0])  # [1, V]
        hf_tokens.append(int(out.logits[0, -1].argmax()))
    assert len(prompt) + steps > ORIGINAL_MAX + 5
    assert ours_tokens == hf_tokens
    for ours, ref in zip(ours_logits, hf_logits, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # Keeping the short factors past 4096 gives visibly different logits from the switch point on.
    short_logits, _ = _our_decode([model], prompt, steps, forced=hf_tokens, switch=False)
    crossing = ORIGINAL_MAX - len(prompt) + 1  # first forward with max(position) + 1 > 4096
    torch.testing.assert_close(
        short_logits[crossing - 1], hf_logits[crossing - 1], atol=1e-4, rtol=1e-4
    )
    assert (short_logits[crossing] - hf_logits[crossing]).abs().max() > 1e-3


@torch.inference_mode()
def test_pipeline_stages_chain_to_the_whole_model(tmp_path: Path) -> None:
    _, path = _build(tmp_path, "qwen2", num_layers=3)
    whole = DecoderModel.from_checkpoint(path, dtype=torch.float32)
    stages = [
        DecoderModel.from_checkpoint(path, start_layer=i, end_layer=i + 1, dtype=torch.float32)
        for i in range(3)
    ]
    assert [(s.is_first_stage, s.is_last_stage, s.num_layers) for s in stages] == [
        (True, False, 1),
        (False, False, 1),
        (False, True, 1),
    ]
    assert stages[1].embedding is None and stages[1].lm_head is None
    prompt = _prompt(21, seed=3)
    whole_prefill, whole_tokens = _our_greedy([whole], prompt, 12)
    staged_prefill, staged_tokens = _our_greedy(stages, prompt, 12)
    torch.testing.assert_close(staged_prefill, whole_prefill, atol=1e-6, rtol=1e-6)
    assert staged_tokens == whole_tokens


def test_stage_loads_only_its_own_keys(tmp_path: Path) -> None:
    _, path = _build(tmp_path, "llama", num_layers=3)
    file = path / "x.safetensors"
    state = load_file(str(file))
    kept = {
        k: v
        for k, v in state.items()
        if not k.startswith("language_model.model.layers.0.") and "embed_tokens" not in k
    }
    save_file(kept, str(file))
    middle = DecoderModel.from_checkpoint(path, start_layer=1, end_layer=2, dtype=torch.float32)
    torch.testing.assert_close(
        middle.layers[0].mlp.down_proj.weight,
        state["language_model.model.layers.1.mlp.down_proj.weight"],
    )
    DecoderModel.from_checkpoint(path, start_layer=1, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        DecoderModel.from_checkpoint(path, start_layer=0, end_layer=1, dtype=torch.float32)


@torch.inference_mode()
def test_tied_head_shares_the_embedding(tmp_path: Path) -> None:
    hf, path = _build(tmp_path, "llama", num_layers=2, tie=True)
    whole = DecoderModel.from_checkpoint(path, dtype=torch.float32)
    assert whole.lm_head.weight is whole.embedding.weight
    last = DecoderModel.from_checkpoint(path, start_layer=1, dtype=torch.float32)
    torch.testing.assert_close(last.lm_head.weight, whole.embedding.weight)
    prompt = _prompt(9, seed=4)
    prefill, tokens = _our_greedy([whole], prompt, 16)
    torch.testing.assert_close(prefill, hf(torch.tensor([prompt])).logits[0], atol=1e-4, rtol=1e-4)
    assert tokens == _hf_generate(hf, prompt, 16)


def test_kv_cache_shape_and_allocation(tmp_path: Path) -> None:
    _, path = _build(tmp_path, "qwen2", num_layers=2)
    model = DecoderModel.from_checkpoint(path, start_layer=1, dtype=torch.bfloat16)
    assert model.kv_cache_shape(5, BLOCK_SIZE) == (2, 5, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    caches = model.allocate_kv_caches(5, BLOCK_SIZE)
    assert len(caches) == 1 and caches[0].dtype == torch.bfloat16 and not caches[0].any()
    assert model.layers[0].self_attn.qkv_proj.bias is not None  # Qwen2 q/k/v bias
