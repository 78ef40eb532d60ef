"""Decode attention over the paged cache: one padded SDPA call vs length groups.

A decode step's one-query sequences used to share one SDPA call with every key list padded to
the longest context; `plan_attention` now groups them by length (`group_by_length`). This times
one layer's `paged_attention` (plan included) on batches of 32 decode sequences, grouped and
forced into one group, and prints one JSON line: ms per layer-step for each batch and the
speed-up, plus the largest output difference between the two (padding changes no value).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch

from internvl_core.model import sdpa_attention
from internvl_core.model.attention import paged_attention, plan_attention
from internvl_core.model.attention_metadata import AttentionMetadata

BATCHES = {
    "skewed_1x4096_31x256": [4096] + [256] * 31,
    "spread_32x64_to_2016": [64 + 63 * i for i in range(32)],
    "equal_32x512": [512] * 32,
}


def _decode_batch(lens: list[int], block_size: int, kv_heads: int, head_dim: int) -> tuple:
    """A cache holding `lens` tokens per sequence (random K/V) and its decode-step metadata."""
    per_seq = [(n + block_size - 1) // block_size for n in lens]
    cache = torch.randn(2, sum(per_seq) + 1, block_size, kv_heads, head_dim)
    starts = [1 + sum(per_seq[:i]) for i in range(len(lens))]  # block 0 stays unused
    tables = [list(range(s, s + n)) for s, n in zip(starts, per_seq, strict=True)]
    attn = AttentionMetadata.for_contiguous([1] * len(lens), lens, tables, block_size)
    return cache, attn


def _time_ms(fn: Any, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) * 1e3 / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    opts = parser.parse_args()
    torch.manual_seed(0)
    out: dict[str, Any] = {}
    device = "cpu"
    for name, lens in BATCHES.items():
        cache, attn = _decode_batch(lens, opts.block_size, opts.kv_heads, opts.head_dim)
        q = torch.randn(len(lens), opts.heads, opts.head_dim)
        k = torch.randn(len(lens), opts.kv_heads, opts.head_dim)
        v = torch.randn(len(lens), opts.kv_heads, opts.head_dim)
        scale = opts.head_dim**-0.5

        def step(q=q, k=k, v=v, cache=cache, attn=attn, scale=scale) -> torch.Tensor:
            return paged_attention(q, k, v, cache, attn, scale, plan=plan_attention(attn, device))

        grouped_ms = _time_ms(step, opts.repeats)
        grouped = step()
        num_groups = len(plan_attention(attn, device).decode_groups)
        saved = dict(sdpa_attention.GROUP_COST_ROWS)
        sdpa_attention.GROUP_COST_ROWS[device] = 2**62  # never split: the old single padded call
        try:
            padded_ms = _time_ms(step, opts.repeats)
            padded = step()
        finally:
            sdpa_attention.GROUP_COST_ROWS.update(saved)
        out[name] = {
            "grouped_ms": round(grouped_ms, 2),
            "padded_ms": round(padded_ms, 2),
            "speedup": round(padded_ms / grouped_ms, 2),
            "groups": num_groups,
            "max_abs_diff": float((grouped - padded).abs().max()),
        }
    threads = torch.get_num_threads()
    out["device"] = f"cpu: {platform.machine()}, {threads} torch threads"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
