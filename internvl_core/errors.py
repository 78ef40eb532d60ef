"""Errors, one class per user mistake; the ingress maps them to OpenAI error JSON in one table.

Messages name the field and the limit, e.g. "prompt has 9001 tokens; max_model_len is 8192".
"""

from __future__ import annotations


class InternVLError(Exception):
    """Base of every error this project raises on purpose."""

    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class CheckpointError(InternVLError):
    """A checkpoint folder is missing files, has unknown config values or wrong tensors."""

    error_type = "checkpoint_error"


class InvalidRequestError(InternVLError):
    """A request field is malformed or out of range (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class RequestSchemaError(InvalidRequestError):
    """The body does not fit the request schema: a wrong type, a missing or unknown field (422)."""

    status_code = 422


class ContextLengthError(InvalidRequestError):
    """Prompt (+ max_tokens) does not fit max_model_len or the KV pool (400)."""

    error_type = "context_length_exceeded"


class MediaError(InvalidRequestError):
    """An image or video cannot be fetched, decoded or is refused by a limit (400)."""

    error_type = "invalid_media"


class PayloadTooLargeError(InvalidRequestError):
    """Media bytes or pixels over a configured limit (413)."""

    status_code = 413
    error_type = "payload_too_large"


class ModelNotFoundError(InternVLError):
    """The request names a model this server does not serve (404)."""

    status_code = 404
    error_type = "model_not_found"


class EngineOverloadedError(InternVLError):
    """Queues are full; retry later (503 with Retry-After)."""

    status_code = 503
    error_type = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDeadError(InternVLError):
    """A stage or the engine loop died; the replica must be replaced (503)."""

    status_code = 503
    error_type = "engine_dead"


class AuthenticationError(InternVLError):
    """A `/v1/*` request without a valid API key while keys are configured (401)."""

    status_code = 401
    error_type = "authentication_error"
