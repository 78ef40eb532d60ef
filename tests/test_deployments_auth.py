"""Tests for deployments/auth.py: key sources, the bearer check, and keys kept out of reprs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from deployments.auth import ApiKeyAuth, load_api_keys
from internvl_core.errors import AuthenticationError
from internvl_core.serve_args import ServeArgs


def _args(model: Path, **fields: Any) -> ServeArgs:
    return ServeArgs.model_validate({"model_path": str(model), **fields})


def test_off_by_default(tiny_qwen2: Path) -> None:
    assert ApiKeyAuth.from_args(_args(tiny_qwen2)) is None


def test_keys_from_yaml_file_and_env_are_united(
    tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("INTERNVL_TEST_KEYS", "env-key-1, env-key-2")
    args = _args(
        tiny_qwen2,
        api_keys=["yaml-key"],
        api_keys_file=str(key_file),
        api_keys_env="INTERNVL_TEST_KEYS",
    )
    assert load_api_keys(args) == ["yaml-key", "file-key-1", "file-key-2", "env-key-1", "env-key-2"]
    auth = ApiKeyAuth.from_args(args)
    assert auth is not None and auth.num_keys == 5
    for key in load_api_keys(args):
        auth.check(f"Bearer {key}")
    auth.check("bearer   env-key-2 ")  # scheme case and surrounding spaces do not matter


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"api_keys_file": "/nonexistent/keys"}, "api_keys_file"),
        ({"api_keys_env": "INTERNVL_TEST_UNSET_VARIABLE"}, "api_keys_env"),
        ({"api_keys": [" "]}, "api_keys"),
    ],
)
def test_a_source_without_keys_fails_naming_the_field(
    tiny_qwen2: Path, fields: dict[str, Any], field: str
) -> None:
    # A typo in a path or variable name must not turn authentication off silently.
    with pytest.raises(ValueError, match=field):
        ApiKeyAuth.from_args(_args(tiny_qwen2, **fields))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing API key"),
        ("", "missing API key"),
        ("Bearer", "missing API key"),
        ("Basic c2stYQ==", "missing API key"),
        ("sk-a", "missing API key"),
        ("Bearer sk-b", "invalid API key"),
        ("Bearer sk-a-longer", "invalid API key"),
        ("Bearer sk-", "invalid API key"),
    ],
)
def test_check_refuses_missing_and_wrong_keys(header: str | None, message: str) -> None:
    auth = ApiKeyAuth(["sk-a", "sk-c"])
    with pytest.raises(AuthenticationError, match=message) as info:
        auth.check(header)
    assert info.value.status_code == 401
    assert "sk-" not in info.value.message  # neither the key nor the token is echoed


def test_only_the_api_is_guarded() -> None:
    assert ApiKeyAuth.guards("/v1/chat/completions") and ApiKeyAuth.guards("/v1/models")
    assert not ApiKeyAuth.guards("/health") and not ApiKeyAuth.guards("/v1/health")


def test_keys_never_reach_reprs_or_logs(tiny_qwen2: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    args = _args(tiny_qwen2, api_keys=["sk-secret-yaml-key"])
    auth = ApiKeyAuth.from_args(args)
    logging.getLogger("test").info("args: %s / %r / %s", args, args, args.model_dump())
    with pytest.raises(AuthenticationError):
        assert auth is not None
        auth.check("Bearer sk-secret-wrong")
    assert "sk-secret" not in caplog.text
    assert "sk-secret" not in repr(vars(auth))  # the replica holds digests only
