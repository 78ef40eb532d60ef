"""Pure library: InternVL2 checkpoints, preprocessing, vision, decoders and the LLM engine.

The public names below load on first use (`from internvl_core import InternVLChat`), so that
`import internvl_core` itself stays light: no torch, no transformers, no checkpoint code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from internvl_core.chat import InternVLChat
    from internvl_core.config import EngineConfig, ModelArchitecture, SamplingParams
    from internvl_core.engine import AsyncLLMEngine, LLMEngine
    from internvl_core.serve_args import ServeArgs
    from internvl_core.vision.encoder import VisionEncoder

# Public name -> the module that defines it.
_EXPORTS = {
    "InternVLChat": "internvl_core.chat",
    "LLMEngine": "internvl_core.engine",
    "AsyncLLMEngine": "internvl_core.engine",
    "VisionEncoder": "internvl_core.vision.encoder",
    "EngineConfig": "internvl_core.config",
    "ModelArchitecture": "internvl_core.config",
    "SamplingParams": "internvl_core.config",
    "ServeArgs": "internvl_core.serve_args",
}

__all__ = [
    "AsyncLLMEngine",
    "EngineConfig",
    "InternVLChat",
    "LLMEngine",
    "ModelArchitecture",
    "SamplingParams",
    "ServeArgs",
    "VisionEncoder",
]


def __getattr__(name: str) -> Any:
    """Import the defining module of a public name on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'internvl_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
