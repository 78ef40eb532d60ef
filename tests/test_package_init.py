"""Tests for internvl_core/__init__.py: the model card's front door `from internvl_core import
InternVLChat` works, and `import internvl_core` alone stays light (no torch, no transformers)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import internvl_core


def _run(code: str) -> str:
    """`code` in a fresh interpreter (this one has torch loaded already); its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return done.stdout.strip()


def test_import_is_light() -> None:
    heavy = ("torch", "transformers", "internvl_core.chat", "internvl_core.engine", "ray")
    out = _run(f"import sys, internvl_core; print([m for m in {heavy!r} if m in sys.modules])")
    assert out == "[]"


def test_front_door_names_resolve() -> None:
    from internvl_core import InternVLChat, LLMEngine, SamplingParams, ServeArgs
    from internvl_core.chat import InternVLChat as Defined
    from internvl_core.config import SamplingParams as DefinedParams

    assert InternVLChat is Defined
    assert SamplingParams is DefinedParams
    assert LLMEngine.__name__ == "LLMEngine"
    assert ServeArgs.__name__ == "ServeArgs"
    assert set(internvl_core.__all__) <= set(dir(internvl_core))
    for name in internvl_core.__all__:
        assert getattr(internvl_core, name).__name__ == name


def test_front_door_in_a_fresh_interpreter() -> None:
    out = _run("from internvl_core import InternVLChat; print(InternVLChat.__module__)")
    assert out == "internvl_core.chat"


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        internvl_core.Nope  # noqa: B018
    with pytest.raises(ImportError):
        from internvl_core import Nope  # noqa: F401
