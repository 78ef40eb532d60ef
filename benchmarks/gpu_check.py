"""One-command device check of the engine's GPU path (random weights, no downloads); one JSON line.

Sections: `attention` (paged attention time and peak memory at the 8B and 76B shapes, decode and
chunked prefill, per implementation in ATTENTION_IMPLS); `decoder` (an 8B-shaped bf16 decoder
through ModelRunner, ms per decode step and tokens/s at batch 1/16/64/128 with 1k context, per
mode in DECODE_MODES); `kv` (the measured KV plan, then a decode over sequences that fill the
whole pool and a chunked prefill at the step limit); `pp_hop` (a hidden-state hop between two
Ray actors, object store vs P2P; P2P on CUDA needs two GPUs). Under 8 minutes on one H100/H200.
`--device cpu --dry-run` runs every section on tiny shapes in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from internvl_core.config import EngineConfig, LLMArchitecture
from internvl_core.engine.batch import ScheduledBatch
from internvl_core.engine.compiled_decode import CompiledDecode
from internvl_core.engine.memory_plan import CudaMemoryReader, measure_kv_plan
from internvl_core.engine.model_runner import ModelRunner
from internvl_core.model.attention import choose_backend, paged_attention, plan_attention
from internvl_core.model.attention_metadata import AttentionMetadata
from internvl_core.model.decoder import DecoderModel
from internvl_core.model.varlen_attention import varlen_supported

SECTIONS = ("attention", "decoder", "kv", "pp_hop")
BLOCK = 16  # --block-size
VARLEN_BLOCK_SIZES = (16, 32, 64, 128, 256)
GIB = 1 << 30


# ---- hooks: a new attention path or compiled decode registers itself here --------------------
def _fused_backend(q: torch.Tensor, cache: torch.Tensor, block_size: int) -> str:
    heads = (q.shape[1], cache.shape[3], q.shape[2])
    return choose_backend(q.device, q.dtype, block_size=block_size, heads=heads)


def _sdpa_attention(q, k, v, cache, attn, scale):  # type: ignore[no-untyped-def]
    plan = plan_attention(attn, q.device, backend="sdpa")
    return paged_attention(q, k, v, cache, attn, scale, plan=plan)


def _fused_attention(q, k, v, cache, attn, scale):  # type: ignore[no-untyped-def]
    """What the engine picks: varlen on CUDA (a block size it accepts), the C++ kernel on CPU."""
    backend = _fused_backend(q, cache, attn.block_size)
    plan = plan_attention(attn, q.device, backend=backend)
    return paged_attention(q, k, v, cache, attn, scale, plan=plan)


# "sdpa": grouped SDPA over gathered keys (the old path); "fused": the engine's choice.
ATTENTION_IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": _sdpa_attention,
    "fused": _fused_attention,
}


def _graphs(runner: ModelRunner) -> Callable[[ScheduledBatch], Any]:
    """Compiled decode over the same model and KV pool: CUDA graphs per bucket on CUDA; on CPU
    the same buckets traced by dynamo's eager backend (the dry run stays fast). The pool's last
    block is the padding rows' scratch (check_decode's tables never reach it)."""
    assert runner.kv_cache is not None
    cuda = runner.device.type == "cuda"
    decode = CompiledDecode(
        runner.model,
        max_num_seqs=128,
        max_model_len=2048,
        block_size=BLOCK,
        use_cuda_graphs=cuda,
        backend="inductor" if cuda else "eager",
    )
    decode.bind(runner.kv_cache.tensors, scratch_block=runner.kv_cache.num_blocks - 1)
    start = time.perf_counter()
    decode.warm_up()  # what a replica does at start-up: every batch bucket compiled and captured
    WARM_UP_S["graphs"] = round(time.perf_counter() - start, 1)
    graphs = ModelRunner(runner.model, block_size=BLOCK, compiled_decode=decode)
    graphs.kv_cache = runner.kv_cache
    return graphs.execute


WARM_UP_S: dict[str, float] = {}  # mode -> seconds its start-up warm-up took

# mode -> (runner -> a callable that runs one ScheduledBatch).
DECODE_MODES: dict[str, Callable[[ModelRunner], Callable[[ScheduledBatch], Any]]] = {
    "eager": lambda runner: runner.execute,
    "graphs": _graphs,
}


# ---- shapes ------------------------------------------------------------------------------------
def attention_shapes(dry_run: bool) -> dict[str, tuple[int, int, int]]:
    """name -> (H, K, d)."""
    if dry_run:
        return {"tiny": (4, 2, 16)}
    return {"8b": (32, 8, 128), "76b": (64, 8, 128)}


def attention_cases(dry_run: bool) -> dict[str, tuple[list[int], list[int]]]:
    """name -> (query_lens, seq_lens) of one step."""
    if dry_run:
        return {"decode": ([1] * 4, [40] * 4), "chunked_prefill": ([24], [64])}
    return {
        "decode_64x2k": ([1] * 64, [2048] * 64),
        "decode_16x8k": ([1] * 16, [8192] * 16),
        "chunked_prefill_2k_at_8k": ([2048], [8192]),
    }


def decoder_arch(dry_run: bool) -> LLMArchitecture:
    """InternVL2-8B's LLM (InternLM2.5-7B) shape, or a tiny one."""
    big = dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=92553,
        max_position_embeddings=32768,
    )
    tiny = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=4096,
    )
    return LLMArchitecture(
        family="internlm2",
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        attention_bias=False,
        **(tiny if dry_run else big),
    )


# ---- helpers -----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3 / repeats


def _peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocation of one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)


def _tables(seq_lens: list[int], first_block: int = 0) -> list[list[int]]:
    tables, start = [], first_block
    for n in seq_lens:
        num = math.ceil(n / BLOCK)
        tables.append(list(range(start, start + num)))
        start += num
    return tables


def decode_batch(batch_id: int, context_lens: list[int], tables: list[list[int]]) -> ScheduledBatch:
    """Greedy decode of one token per sequence after `context_lens` cached tokens."""
    return ScheduledBatch.greedy_decode(
        batch_id, context_lens, tables, BLOCK, request_prefix="check", token_id=7
    )


# ---- sections ----------------------------------------------------------------------------------
def check_attention(device: torch.device, dtype: torch.dtype, opts: argparse.Namespace) -> dict:
    out: dict[str, Any] = {}
    impls = opts.attention_impls.split(",")
    for shape_name, (heads, kv_heads, head_dim) in attention_shapes(opts.dry_run).items():
        for case, (query_lens, seq_lens) in attention_cases(opts.dry_run).items():
            tables = _tables(seq_lens)
            cache = torch.randn(
                2, sum(map(len, tables)), BLOCK, kv_heads, head_dim, dtype=dtype, device=device
            )  # [2, N, B, K, d]
            attn = AttentionMetadata.for_contiguous(
                query_lens, seq_lens, tables, BLOCK, device=device
            )
            num_tokens = sum(query_lens)
            q = torch.randn(num_tokens, heads, head_dim, dtype=dtype, device=device)  # [T, H, d]
            k = torch.randn(num_tokens, kv_heads, head_dim, dtype=dtype, device=device)  # [T, K, d]
            v = torch.randn_like(k)  # [T, K, d]
            out[f"{shape_name}_fused_backend"] = _fused_backend(q, cache, BLOCK)
            if device.type == "cuda":
                out[f"{shape_name}_varlen_block_sizes"] = {
                    bs: varlen_supported(device, dtype, bs, heads, kv_heads, head_dim)
                    for bs in VARLEN_BLOCK_SIZES
                }
            reference = None
            for impl in impls:
                fn = ATTENTION_IMPLS[impl]

                def step(fn=fn, q=q, k=k, v=v, cache=cache, attn=attn, d=head_dim) -> torch.Tensor:
                    return fn(q, k, v, cache, attn, d**-0.5)

                result = step().float()  # [T, H, d]
                reference = result if reference is None else reference
                out[f"{shape_name}_{case}_{impl}"] = {
                    "ms": round(_time_ms(step, device, opts.repeats), 3),
                    "peak_mib": _peak_mib(step, device),
                    "max_abs_diff_vs_first": round((result - reference).abs().max().item(), 6),
                }
            del cache, q, k, v
    return out


def build_runner(device: torch.device, dtype: torch.dtype, dry_run: bool) -> ModelRunner:
    model = DecoderModel(decoder_arch(dry_run), dtype=dtype, device=device)  # random weights
    _sync(device)
    return ModelRunner(model, block_size=BLOCK)


def check_kv_plan(runner: ModelRunner, config: EngineConfig) -> dict:
    """The measured plan (CUDA) or the config's blocks (CPU), then the pool allocated."""
    start = time.perf_counter()
    out: dict[str, Any] = {}
    if runner.device.type == "cuda":
        plan = measure_kv_plan(runner, config, CudaMemoryReader(runner.device))
        num_blocks = plan.num_blocks
        out.update(
            weights_gib=round(plan.weights_bytes / GIB, 2),
            activation_peak_gib=round(plan.activation_peak_bytes / GIB, 2),
            other_gib=round(plan.other_bytes / GIB, 2),
            graph_gib=round(plan.graph_bytes / GIB, 2),
            kv_gib=round(plan.kv_bytes / GIB, 2),
            total_gib=round(plan.total_bytes / GIB, 2),
        )
    else:
        num_blocks = runner.plan_kv_blocks(config)
    out["plan_s"] = round(time.perf_counter() - start, 2)
    runner.init_kv_cache(num_blocks)
    out.update(num_blocks=num_blocks, max_concurrent_tokens=num_blocks * BLOCK)
    return out


def check_decode(runner: ModelRunner, opts: argparse.Namespace) -> dict:
    """ms per decode step and tokens/s per batch size, 1k context, for each decode mode."""
    out: dict[str, Any] = {}
    context = 32 if opts.dry_run else 1024
    batches = [1, 4] if opts.dry_run else [1, 16, 64, 128]
    assert runner.kv_cache is not None
    for mode in opts.decode_modes.split(","):
        run = DECODE_MODES[mode](runner)
        if mode in WARM_UP_S:
            out[f"{mode}_warm_up_s"] = WARM_UP_S[mode]
        for bs in batches:
            tables = _tables([context + 1] * bs)
            if tables[-1][-1] >= runner.kv_cache.num_blocks - 1:  # the last: graphs' scratch
                out[f"{mode}_bs{bs}"] = {"skipped": "pool too small"}
                continue
            batch = decode_batch(bs, [context] * bs, tables)
            ms = _time_ms(lambda batch=batch, run=run: run(batch), runner.device, opts.repeats)
            out[f"{mode}_bs{bs}"] = {
                "ms_per_step": round(ms, 2),
                "tokens_per_s": round(bs / ms * 1e3),
            }
    return out


def check_fill(runner: ModelRunner, config: EngineConfig) -> dict:
    """A decode step over sequences that hold every block of the pool, then a chunked prefill
    at max_num_batched_tokens with a max_model_len context (the profile step's shape). An
    out-of-memory is a finding (`ok: false`, `oom`), not a crash of the check."""
    assert runner.kv_cache is not None
    num_blocks = runner.kv_cache.num_blocks
    per_seq = max(1, config.max_model_len // BLOCK)  # blocks per sequence, at most
    tables = [list(range(s, min(s + per_seq, num_blocks))) for s in range(0, num_blocks, per_seq)]
    contexts = [len(t) * BLOCK - 1 for t in tables]  # the new token takes the last free slot
    out: dict[str, Any] = {"num_seqs": len(tables), "cached_tokens": sum(contexts)}
    seq_len = min(config.max_model_len, len(tables[0]) * BLOCK)
    chunk = min(config.max_num_batched_tokens, seq_len)
    prefill = decode_batch(1, [seq_len - chunk], [tables[0]])
    prefill.query_lens, prefill.prompt_lens = [chunk], [seq_len]
    prefill.input_token_ids = [7] * chunk
    steps = {"decode": decode_batch(0, contexts, tables), "prefill": prefill}
    out["ok"] = True
    for name, batch in steps.items():
        try:
            step = lambda batch=batch: runner.execute(batch)  # noqa: E731
            out[f"{name}_ms"] = round(_time_ms(step, runner.device, 1), 1)
            out[f"{name}_peak_mib"] = _peak_mib(step, runner.device)
        except torch.OutOfMemoryError as e:
            out["ok"] = False
            out[f"{name}_oom"] = str(e).splitlines()[0][:300]
            if runner.device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def host_hop(shapes: list[tuple[int, int]], device: torch.device, repeats: int) -> dict:
    """What an object-store hop does to a device tensor, without Ray: device -> host, pickle,
    unpickle, host -> device (Ray adds its plasma copies on top: a lower bound). Beside it a
    device-to-device copy of the same bytes, the floor a direct transport approaches."""
    import pickle

    out: dict[str, Any] = {"note": "ray not importable here: in-process lower bound"}
    for rows, cols in shapes:
        hidden = torch.randn(rows, cols, dtype=torch.float32, device=device)  # [rows, cols]

        def via_host(hidden: torch.Tensor = hidden) -> torch.Tensor:
            blob = pickle.dumps(hidden.cpu())
            return pickle.loads(blob).to(device)

        def direct(hidden: torch.Tensor = hidden) -> torch.Tensor:
            return hidden.clone()

        out[f"{rows}x{cols}"] = {
            "host_pickle_ms": round(_time_ms(via_host, device, repeats), 2),
            "device_copy_ms": round(_time_ms(direct, device, repeats), 3),
            "mib": round(rows * cols * 4 / 2**20, 1),
        }
        del hidden
    return out


def check_pp_hop(device: torch.device, dry_run: bool) -> dict:
    shapes = [(4, 64)] if dry_run else [(256, 4096), (8192, 8192)]
    try:
        import ray
    except ImportError:
        return host_hop(shapes, device, repeats=3 if dry_run else 7)
    from pp_hop import measure

    modes: tuple[str, ...] = ("object_store", "p2p")
    note = None
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        modes, note = ("object_store",), "p2p (NCCL) needs two GPUs; object store only"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    num_gpus = min(2, torch.cuda.device_count()) if device.type == "cuda" else 0
    ray.init(address="local", num_cpus=2, num_gpus=num_gpus, include_dashboard=False)
    try:
        out = measure(
            shapes,
            device=device.type,
            modes=modes,
            repeats=3 if dry_run else 7,
            gpus_per_actor=1.0 if num_gpus >= 2 else 0.5,
        )
    finally:
        ray.shutdown()
    if note:
        out["note"] = note
    return out


def _section(out: dict, name: str, fn: Callable[[], dict]) -> None:
    start = time.perf_counter()
    try:
        out[name] = fn()
    except Exception as e:  # one failing section must not cost the others' device time
        out[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    out[name]["section_s"] = round(time.perf_counter() - start, 1)


def main(argv: list[str] | None = None) -> None:
    global BLOCK
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--attention-impls", default=",".join(ATTENTION_IMPLS))
    parser.add_argument("--decode-modes", default=",".join(DECODE_MODES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=BLOCK, help="KV block (page) size")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    opts = parser.parse_args(argv)
    BLOCK = opts.block_size
    if opts.dry_run:
        opts.repeats = min(opts.repeats, 2)
    start = time.perf_counter()
    device = torch.device(opts.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    sections = opts.sections.split(",")
    config = EngineConfig(
        block_size=BLOCK,
        max_num_seqs=8 if opts.dry_run else 128,
        max_num_batched_tokens=48 if opts.dry_run else 2048,
        max_model_len=128 if opts.dry_run else 8192,
        gpu_memory_utilization=opts.gpu_memory_utilization,
        kv_cache_memory_bytes=(256 << 10) if device.type == "cpu" else None,
    )
    out: dict[str, Any] = {"dry_run": opts.dry_run}
    if "attention" in sections:
        _section(out, "attention", lambda: check_attention(device, dtype, opts))
    if {"decoder", "kv"} & set(sections):
        build_start = time.perf_counter()
        runner = build_runner(device, dtype, opts.dry_run)
        out["decoder_build_s"] = round(time.perf_counter() - build_start, 1)
        _section(out, "kv", lambda: check_kv_plan(runner, config))
        if "decoder" in sections and runner.kv_cache is not None:
            _section(out, "decoder", lambda: check_decode(runner, opts))
        if "kv" in sections and runner.kv_cache is not None:
            _section(out["kv"], "fill", lambda: check_fill(runner, config))
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "pp_hop" in sections:
        _section(out, "pp_hop", lambda: check_pp_hop(device, opts.dry_run))
    out["torch"] = torch.__version__
    if device.type == "cuda":
        out["device"] = f"cuda: {torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}"
    else:
        out["device"] = f"cpu: {platform.machine()}, {torch.get_num_threads()} torch threads"
    out["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
