"""Session fixtures for the whole suite: offline hub, seeded torch, tiny checkpoints, gpu auto-skip.

`tiny_checkpoint(family=..., **kwargs)` writes each distinct tiny checkpoint once per session.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from internvl_core.testing.tiny import make_tiny_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU tensors. Set before anything imports triton
    # (torch.compile does): jit functions decorated earlier would not be interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


TinyCheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpointFactory:
    """Factory `tiny_checkpoint(family="qwen2", **make_tiny_checkpoint_kwargs) -> Path`, cached."""
    cache: dict[str, Path] = {}

    def build(family: str = "qwen2", **kwargs: Any) -> Path:
        key = json.dumps({"family": family, **kwargs}, sort_keys=True, default=str)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{family}")
            cache[key] = make_tiny_checkpoint(out, family=family, **kwargs)  # type: ignore[arg-type]
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_checkpoint: TinyCheckpointFactory) -> Path:
    """InternVL2-1B-like: Qwen2 decoder, 300M-style ViT, ps v2."""
    return tiny_checkpoint("qwen2")


@pytest.fixture(scope="session")
def tiny_internlm2(tiny_checkpoint: TinyCheckpointFactory) -> Path:
    """InternVL2-2B/8B-like: InternLM2 decoder + sentencepiece tokenizer, 300M-style ViT."""
    return tiny_checkpoint("internlm2")


@pytest.fixture(scope="session")
def tiny_phi3(tiny_checkpoint: TinyCheckpointFactory) -> Path:
    """InternVL2-4B-like: Phi-3 decoder (su rope scaling), 300M-style ViT."""
    return tiny_checkpoint("phi3")


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoint: TinyCheckpointFactory) -> Path:
    """InternVL2-Llama3-76B-like: Llama-3 decoder, 300M-style ViT."""
    return tiny_checkpoint("llama")


@pytest.fixture(scope="session")
def tiny_internlm2_6b(tiny_checkpoint: TinyCheckpointFactory) -> Path:
    """InternVL2-26B-like: InternLM2 decoder, 6B-style ViT (RMSNorm, qk-norm, no qkv bias)."""
    return tiny_checkpoint("internlm2", vit="6b")
