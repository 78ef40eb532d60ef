"""Compiled vs eager decode step time through ModelRunner, on a mid-size random decoder.

Decode-only steps (one token per sequence, `--context` cached tokens each) at several batch
sizes, eager vs `CompiledDecode` (inductor) vs inductor with weight freezing (constant-folded,
oneDNN-prepacked linears on CPU). Modes are interleaved over rounds and the median kept (the
machine is shared). Prints one JSON line: ms per step per mode and batch, compile seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.config as inductor_config

from internvl_core.config import LLMArchitecture
from internvl_core.engine.batch import ScheduledBatch
from internvl_core.engine.compiled_decode import CompiledDecode
from internvl_core.engine.model_runner import ModelRunner
from internvl_core.model.decoder import DecoderModel

logger = logging.getLogger(__name__)
MODES = ("eager", "compiled", "frozen")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--context", type=int, default=384, help="cached tokens per sequence")
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians kept")
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def build_model(args: argparse.Namespace, device: torch.device) -> DecoderModel:
    arch = LLMArchitecture(
        family="qwen2",
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=args.max_model_len,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        attention_bias=True,
    )
    torch.manual_seed(0)
    return DecoderModel(arch, dtype=torch.float32, device=device).eval()  # random weights


def decode_batch(batch_id: int, num_seqs: int, context: int, block_size: int) -> ScheduledBatch:
    per_seq = math.ceil((context + 1) / block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(num_seqs)]
    return ScheduledBatch.greedy_decode(
        batch_id, [context] * num_seqs, tables, block_size, request_prefix="bench", token_id=7
    )


def make_runner(model: DecoderModel, mode: str, args: argparse.Namespace) -> ModelRunner:
    compiled = None
    if mode != "eager":
        compiled = CompiledDecode(
            model,
            max_num_seqs=max(int(b) for b in args.batches.split(",")),
            max_model_len=args.max_model_len,
            block_size=args.block_size,
            use_cuda_graphs=model.device.type == "cuda",
        )
    runner = ModelRunner(model, block_size=args.block_size, compiled_decode=compiled)
    max_seqs = max(int(b) for b in args.batches.split(","))
    runner.init_kv_cache(max_seqs * math.ceil((args.context + 1) / args.block_size))
    return runner


def time_steps(step: Callable[[], Any], device: torch.device, steps: int) -> float:
    """Median ms of `steps` calls."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    model = build_model(args, device)
    modes = args.modes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    runners: dict[str, ModelRunner] = {}
    compile_s: dict[str, dict[int, float]] = {m: {} for m in modes}
    samples: dict[str, dict[int, list[float]]] = {m: {b: [] for b in batches} for m in modes}
    steps = {b: decode_batch(0, b, args.context, args.block_size) for b in batches}
    for mode in modes:
        # Freezing is read when inductor compiles, so it is set around this mode's first calls.
        with inductor_config.patch(freezing=mode == "frozen"):
            runners[mode] = runner = make_runner(model, mode, args)
            for bs in batches:  # first call compiles (batch 1, then one graph for batch > 1)
                start = time.perf_counter()
                runner.execute(steps[bs])
                compile_s[mode][bs] = round(time.perf_counter() - start, 2)
    for _ in range(args.rounds):
        for bs in batches:
            for mode in modes:
                step = lambda r=runners[mode], b=steps[bs]: r.execute(b)  # noqa: E731
                samples[mode][bs].append(time_steps(step, device, args.steps))
    ms = {m: {b: round(statistics.median(v), 2) for b, v in samples[m].items()} for m in modes}
    speedup = {
        m: {b: round(ms["eager"][b] / ms[m][b], 2) for b in batches}
        for m in modes
        if m != "eager" and "eager" in ms
    }
    print(
        json.dumps(
            {
                "benchmark": "compile_decode",
                "device": f"{device.type} ({platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads)",
                "torch": torch.__version__,
                "model": f"qwen2-like hidden {args.hidden}, {args.layers} layers, {args.heads} "
                f"heads, {args.kv_heads} kv heads, intermediate {args.intermediate}, vocab "
                f"{args.vocab}, fp32",
                "context": args.context,
                "ms_per_step": ms,
                "speedup_over_eager": speedup,
                "first_call_s": compile_s,
                "rounds": args.rounds,
                "steps_per_round": args.steps,
            }
        )
    )


if __name__ == "__main__":
    main()
