"""LLM engine throughput vs transformers on one mixed greedy workload (same random weights).

Builds a seeded random Llama (`LlamaForCausalLM`), exports it in the original InternVL key layout,
loads it into our DecoderModel, and runs the same prompts through our LLMEngine, transformers'
static batched `generate` (left padding) and its continuous batching (`generate_batch` manager);
prints one JSON line with tokens/s, ratios, the per-step overhead ratio and token equality.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from internvl_core.config import EngineConfig, LLMArchitecture, SamplingParams
from internvl_core.engine import LLMEngine, LocalStageWorker, ModelRunner, Pipeline
from internvl_core.model.decoder import DecoderModel

logger = logging.getLogger(__name__)


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--init-std", type=float, default=0.02, help="initializer_range of the model")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--hf-batch-size", type=int, default=0, help="static generate chunk; 0 = all")
    p.add_argument("--overhead-steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="best of N timed runs per system")
    p.add_argument("--skip-hf", action="store_true", help="only run our engine")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_workload(args: argparse.Namespace) -> Workload:
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(1, args.vocab) for _ in range(rng.randint(*args.prompt_len))]
        for _ in range(args.num_requests)
    ]
    outputs = [rng.randint(*args.output_len) for _ in range(args.num_requests)]
    return Workload(prompts, outputs)


def build_models(args: argparse.Namespace, folder: Path) -> tuple[LlamaForCausalLM, LLMEngine]:
    """A seeded HF Llama and our engine over the very same weights (via an original-layout file)."""
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.prompt_len[1] + args.output_len[1] + 16,
        initializer_range=args.init_std,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    hf = LlamaForCausalLM(config).eval().to(args.device)
    tensors = {f"language_model.{k}": v.contiguous().cpu() for k, v in hf.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    raw = {**config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    arch = LLMArchitecture.parse(raw)
    model = DecoderModel.from_checkpoint(folder, dtype=torch.float32, device=args.device, arch=arch)
    engine_config = EngineConfig(
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=config.max_position_embeddings,
        kv_cache_memory_bytes=None if args.device.startswith("cuda") else 4 << 30,
        gpu_memory_utilization=0.5,
    )
    runner = ModelRunner(model, block_size=args.block_size)
    engine = LLMEngine(
        Pipeline([LocalStageWorker(runner)]),
        None,
        engine_config,
        eos_token_ids=(),
        image_token_id=None,
        model_arch=arch,
        # `step_overhead` plans batches by hand between steps: no batch may be left in flight.
        async_scheduling=False,
    )
    return hf, engine


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_engine(engine: LLMEngine, work: Workload, device: str) -> tuple[list[list[int]], float]:
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in work.max_tokens]
    _sync(device)
    start = time.perf_counter()
    done = engine.generate(work.prompts, params)
    _sync(device)
    return [o.token_ids for o in done], time.perf_counter() - start


@torch.inference_mode()
def run_hf_static(
    hf: LlamaForCausalLM, work: Workload, batch_size: int, device: str
) -> tuple[list[list[int]], float]:
    """Left-padded batches in input order; each batch runs to its longest max_tokens."""
    size = batch_size or len(work.prompts)
    tokens: list[list[int]] = []
    _sync(device)
    start = time.perf_counter()
    for lo in range(0, len(work.prompts), size):
        prompts, limits = work.prompts[lo : lo + size], work.max_tokens[lo : lo + size]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = hf.generate(
            input_ids=ids,  # [B, width]
            attention_mask=mask,  # [B, width]
            max_new_tokens=max(limits),
            min_new_tokens=max(limits),
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )  # [B, width + new]
        tokens.extend(row[width : width + n].tolist() for row, n in zip(out, limits, strict=True))
    _sync(device)
    return tokens, time.perf_counter() - start


@torch.inference_mode()
def run_hf_cb(
    hf: LlamaForCausalLM, work: Workload, args: argparse.Namespace
) -> tuple[list[list[int]], float, str]:
    """transformers' continuous batching manager, one max_new_tokens per request."""
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(
        page_size=args.block_size * 16,
        max_batch_tokens=args.max_num_batched_tokens,
        max_requests_per_batch=args.max_num_seqs,
        num_blocks=None if args.device.startswith("cuda") else 512,
    )
    _sync(args.device)
    start = time.perf_counter()
    with hf.continuous_batching_context_manager(
        generation_config=gen, continuous_batching_config=cb, warmup=False
    ) as manager:
        attn = str(hf.config._attn_implementation)
        ids = [
            manager.add_request(p, max_new_tokens=n)
            for p, n in zip(work.prompts, work.max_tokens, strict=True)
        ]
        results: dict[str, list[int]] = {}
        while len(results) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = list(result.generated_tokens)
    _sync(args.device)
    return [results[i] for i in ids], time.perf_counter() - start, attn


def _fill_decode_batch(engine: LLMEngine, work: Workload, num: int, steps: int) -> None:
    for i in range(num):
        params = SamplingParams(max_tokens=2 * steps + 4, ignore_eos=True)
        engine.add_request(f"overhead-{i}", work.prompts[i], params)
    while engine.stats.num_waiting or any(
        s.num_output_tokens == 0 for s in engine.scheduler.running
    ):
        engine.step()


@torch.inference_mode()
def _bare_forward(engine: LLMEngine, device: str) -> float:
    """Time embed + layers + head on the next decode batch (then apply it, token 0 for all)."""
    batch = engine.scheduler.schedule()
    assert batch is not None and batch.is_decode_only
    runner = engine.pipeline.stages[0].runner  # type: ignore[attr-defined]
    model, inputs = runner.model, runner.prepare_input(batch)
    _sync(device)
    start = time.perf_counter()
    embeds = model.embed_tokens(inputs.input_ids)  # [num_seqs, D]
    hidden = model(embeds, inputs.positions, runner.kv_cache.tensors, inputs.attn)  # [num_seqs, D]
    model.compute_logits(hidden[inputs.sample_indices])  # [num_seqs, V]
    _sync(device)
    elapsed = time.perf_counter() - start
    engine.scheduler.update(batch.batch_id, [0] * batch.num_seqs)
    return elapsed


def step_overhead(engine: LLMEngine, work: Workload, args: argparse.Namespace) -> dict[str, float]:
    """Decode `step()` wall time over the bare forward of a decode batch of the same sequences,
    measured in interleaved pairs. On a shared CPU the minimum of each is the least disturbed
    estimate (`step_overhead_ratio`); the median of the per-pair ratios is reported too."""
    num = min(len(work.prompts), args.max_num_seqs)
    _fill_decode_batch(engine, work, num, args.overhead_steps)
    step_times, bare_times = [], []
    for _ in range(args.overhead_steps):
        _sync(args.device)
        start = time.perf_counter()
        engine.step()
        _sync(args.device)
        step_times.append(time.perf_counter() - start)
        bare_times.append(_bare_forward(engine, args.device))
    for i in range(num):
        engine.abort(f"overhead-{i}")
    while engine.has_unfinished():
        engine.step()
    ratios = [s / b for s, b in zip(step_times, bare_times, strict=True)]
    return {
        "step_overhead_ratio": round(min(step_times) / min(bare_times), 4),
        "step_overhead_ratio_median_pairs": round(statistics.median(ratios), 4),
        "decode_step_ms": round(1e3 * min(step_times), 2),
        "bare_forward_ms": round(1e3 * min(bare_times), 2),
    }


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads, shared)"


def compare(
    hf: LlamaForCausalLM, engine: LLMEngine, work: Workload, args: argparse.Namespace
) -> dict[str, object]:
    """Best of `--repeats` interleaved timed runs per system; tokens from the last run."""
    warm = Workload(work.prompts[:2], [4, 4])
    run_engine(engine, warm, args.device)
    if not args.skip_hf:
        run_hf_static(hf, warm, 0, args.device)
    times: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    cb_attn = ""
    for _ in range(args.repeats):
        runs = {"engine": lambda: run_engine(engine, work, args.device)}
        if not args.skip_hf:
            runs["hf_static"] = lambda: run_hf_static(hf, work, args.hf_batch_size, args.device)
            runs["hf_cb"] = lambda: run_hf_cb(hf, work, args)
        for name, run in runs.items():
            out = run()
            tokens[name], seconds = out[0], out[1]
            cb_attn = str(out[2]) if len(out) > 2 else cb_attn
            times[name] = min(times.get(name, float("inf")), seconds)
    rates = {name: work.num_output_tokens / sec for name, sec in times.items()}
    result: dict[str, object] = {f"{k}_tok_s": round(v, 2) for k, v in rates.items()}
    if not args.skip_hf:
        ours = tokens["engine"]
        same_static = sum(a == b for a, b in zip(ours, tokens["hf_static"], strict=True))
        same_cb = sum(a == b for a, b in zip(ours, tokens["hf_cb"], strict=True))
        result.update(
            hf_cb_attn_implementation=cb_attn,
            speedup_vs_best_hf=round(rates["engine"] / max(rates["hf_static"], rates["hf_cb"]), 3),
            identical_tokens=same_static == len(ours) and same_cb == len(ours),
            identical_requests_static=f"{same_static}/{len(ours)}",
            identical_requests_cb=f"{same_cb}/{len(ours)}",
        )
    return result


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = make_workload(args)
    with tempfile.TemporaryDirectory() as tmp:
        hf, engine = build_models(args, Path(tmp))
    result = compare(hf, engine, work, args)
    result.update(step_overhead(engine, work, args))
    result.update(
        device=_device_name(args.device),
        load_average_1m=round(os.getloadavg()[0], 2),
        num_requests=args.num_requests,
        output_tokens=work.num_output_tokens,
        params_m=round(sum(p.numel() for p in hf.parameters()) / 1e6, 1),
        repeats=args.repeats,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
