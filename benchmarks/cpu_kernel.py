"""The C++ CPU paged-attention kernel alone (`torch.ops.internvl_cpu.paged_attention`).

One layer's call on fixed batches (random K/V, blocks shuffled across the pool, block size 16):
24 decodes over 400 keys for MHA 8:8 d64, GQA 12:4 d64 and GQA 16:2 d128, and a 64-sequence mixed
batch (lengths 32..768, every 8th sequence a 16-row chunk, the rest decodes). Prints one JSON line:
ms per call, the minimum over repeats of CPU time (`time.process_time`, so other processes on a
shared machine disturb it less than wall time), plus on the decode batches the largest difference
from a dense einsum reference. Run on one core for kernel work alone:

    taskset -c 1 .venv/bin/python benchmarks/cpu_kernel.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from typing import Any

import torch

from internvl_core.model.cpu_kernels import load_cpu_kernels

BLOCK_SIZE = 16


def _batch(
    heads: int, kv_heads: int, head_dim: int, query_lens: list[int], seq_lens: list[int]
) -> tuple[Any, ...]:
    """The op's arguments (q, kv_cache, block_tables, query_start, query_lens, seq_lens, scale)."""
    gen = torch.Generator().manual_seed(0)
    per_seq = [-(-n // BLOCK_SIZE) for n in seq_lens]
    perm = (torch.randperm(sum(per_seq), generator=gen) + 1).tolist()  # block 0 stays unused
    tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.long)
    used = 0
    for i, count in enumerate(per_seq):
        tables[i, :count] = torch.tensor(perm[used : used + count])
        used += count
    q = torch.randn(sum(query_lens), heads, head_dim, generator=gen)  # [T, H, d]
    cache = torch.randn(2, used + 1, BLOCK_SIZE, kv_heads, head_dim, generator=gen)
    starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
    spans = (torch.tensor(x, dtype=torch.long) for x in (starts, query_lens, seq_lens))
    return (q, cache, tables, *spans, head_dim**-0.5)


def _dense_decode(args: tuple[Any, ...]) -> torch.Tensor:
    """Reference for one-query sequences: gather each sequence's keys and attend -> [T, H, d]."""
    q, cache, tables, _, _, seq_lens, scale = args
    group = q.shape[1] // cache.shape[3]
    out = []
    for i, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(n)
        slots = tables[i, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        k, v = (cache[j].flatten(0, 1)[slots].repeat_interleave(group, 1) for j in (0, 1))
        weights = torch.einsum("hd,nhd->hn", q[i], k).mul(scale).softmax(-1)  # [H, n]
        out.append(torch.einsum("hn,nhd->hd", weights, v))
    return torch.stack(out)


def _time_ms(args: tuple[Any, ...], out: torch.Tensor, repeats: int, calls: int = 10) -> float:
    op = torch.ops.internvl_cpu.paged_attention
    op(*args, out)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            op(*args, out)
        best = min(best, (time.process_time() - start) * 1e3 / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    opts = parser.parse_args()
    if not load_cpu_kernels():
        raise SystemExit("the CPU kernel did not build (no C++ compiler?)")
    torch.set_num_threads(opts.threads)
    rng = random.Random(0)
    mixed_seq = [rng.randint(32, 768) for _ in range(64)]
    mixed_query = [16 if i % 8 == 0 else 1 for i in range(64)]
    batches = {
        "mha_8_8_d64_24x400": (8, 8, 64, [1] * 24, [400] * 24),
        "gqa_12_4_d64_24x400": (12, 4, 64, [1] * 24, [400] * 24),
        "gqa_16_2_d128_24x400": (16, 2, 128, [1] * 24, [400] * 24),
        "mha_8_8_d64_mixed64": (8, 8, 64, mixed_query, mixed_seq),
        "gqa_12_4_d64_mixed64": (12, 4, 64, mixed_query, mixed_seq),
    }
    result: dict[str, Any] = {"threads": opts.threads, "machine": platform.machine()}
    for name, spec in batches.items():
        args = _batch(*spec)
        out = torch.empty_like(args[0])
        result[f"{name}_ms"] = round(_time_ms(args, out, opts.repeats), 3)
        if set(spec[3]) == {1}:
            diff = (out - _dense_decode(args)).abs().max().item()
            result[f"{name}_max_diff"] = float(f"{diff:.1e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
