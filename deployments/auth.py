"""API keys for `/v1/*`: `Authorization: Bearer <key>` checked against the configured keys.

In: ServeArgs' `api_keys` / `api_keys_file` / `api_keys_env` (read once, when the app is built)
and each request's Authorization header. Out: nothing, or an AuthenticationError (401). Only
SHA-256 digests of the keys are kept, so the ingress replica's arguments never carry a key, and
no key or presented token is ever logged or echoed in an error.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from internvl_core.config import env_flag
from internvl_core.errors import AuthenticationError
from internvl_core.serve_args import ServeArgs

# Load balancers and orchestrators probe these without credentials.
OPEN_PATHS = frozenset({"/health", "/v1/health"})


def _digest(key: str) -> bytes:
    # Equal-length digests: compare_digest's time then depends on neither key's length.
    return hashlib.sha256(key.encode("utf-8")).digest()


def load_api_keys(args: ServeArgs) -> list[str]:
    """The union of the keys listed in the YAML, in `api_keys_file` and in `api_keys_env`.

    A configured source that holds no key is a config error naming the field: a typo in a
    path or a variable name must not silently turn authentication off.
    """
    keys = [secret.get_secret_value().strip() for secret in args.api_keys]
    if any(not key for key in keys):
        raise ValueError("api_keys holds an empty key")
    if args.api_keys_file is not None:
        path = Path(args.api_keys_file)
        if not path.is_file():
            raise ValueError(f"api_keys_file {str(path)!r} is not a readable file")
        lines = (line.strip() for line in path.read_text().splitlines())
        from_file = [line for line in lines if line and not line.startswith("#")]
        if not from_file:
            raise ValueError(f"api_keys_file {str(path)!r} holds no key")
        keys += from_file
    if args.api_keys_env is not None:
        from_env = [key.strip() for key in env_flag(args.api_keys_env).split(",") if key.strip()]
        if not from_env:
            raise ValueError(f"api_keys_env: environment variable {args.api_keys_env!r} is unset")
        keys += from_env
    return keys


class ApiKeyAuth:
    """Checks a request's bearer token against the keys' digests, in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(key) for key in keys)
        if not self._digests:
            raise ValueError("ApiKeyAuth needs at least one key")

    @classmethod
    def from_args(cls, args: ServeArgs) -> ApiKeyAuth | None:
        """The check the args ask for; None when no key source is configured (off)."""
        configured = (
            args.api_keys or args.api_keys_file is not None or args.api_keys_env is not None
        )
        return cls(load_api_keys(args)) if configured else None

    @property
    def num_keys(self) -> int:
        return len(self._digests)

    @staticmethod
    def guards(path: str) -> bool:
        """Whether `path` (below the app's route prefix) needs a key: the API, not health."""
        return path.startswith("/v1/") and path not in OPEN_PATHS

    def check(self, authorization: str | None) -> None:
        """Raise AuthenticationError unless `authorization` is `Bearer <one of the keys>`."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError(
                "missing API key: send the header 'Authorization: Bearer <key>'"
            )
        given = _digest(token)
        matched = False
        for digest in self._digests:  # every key, no early exit: timing says nothing of which
            matched |= hmac.compare_digest(digest, given)
        if not matched:
            raise AuthenticationError("invalid API key")
