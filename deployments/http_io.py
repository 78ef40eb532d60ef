"""The ingress's HTTP plumbing: the one table from exceptions to OpenAI error JSON and status
codes (with Retry-After on overload), SSE framing, the path below the route prefix and the
request id carried end to end.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from pydantic import ValidationError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse

from deployments.events import unwrap_error
from deployments.replica_loss import REPLICA_LOST_RETRY_AFTER_S, replica_lost
from internvl_core.errors import EngineDeadError, EngineOverloadedError, InternVLError
from internvl_core.protocol import ErrorBody, ErrorResponse
from internvl_core.validation import format_path

logger = logging.getLogger(__name__)


def error_response(exc: BaseException) -> JSONResponse:
    """The single table from our exceptions to OpenAI error JSON and HTTP status codes."""
    exc = unwrap_error(exc)
    exc = replica_lost(exc) or exc
    headers: dict[str, str] = {}
    if isinstance(exc, InternVLError):
        status, kind, message, param = exc.status_code, exc.error_type, exc.message, exc.param
        if isinstance(exc, EngineOverloadedError):
            headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        elif isinstance(exc, EngineDeadError):
            headers["Retry-After"] = str(REPLICA_LOST_RETRY_AFTER_S)
    elif isinstance(exc, ValidationError):
        first = exc.errors()[0]
        param = format_path(first["loc"]) or None
        status, kind = 422, "invalid_request_error"
        message = f"{param}: {first['msg']}" if param else first["msg"]
    elif isinstance(exc, BackPressureError | DeploymentUnavailableError):
        # A stage's Serve queue is full (its `backpressure_config` sets the status and delay)
        # or the stage has no replica yet.
        kind, param = "overloaded", None
        status, retry_s = 503, 1.0
        if isinstance(exc, BackPressureError):
            status, retry_s = exc.status_code, exc.retry_after_s or retry_s
        message = "the server is at capacity; retry shortly"
        headers["Retry-After"] = str(max(1, round(retry_s)))
    else:
        logger.exception("internal error", exc_info=exc)
        status, kind, param = 500, "internal_error", None
        message = f"internal error: {type(exc).__name__}"
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=kind))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def app_path(request: Request) -> str:
    """The path below the app's route prefix (YAML `route_prefix: /internvl` serves
    `/internvl/v1/chat/completions`); ASGI servers keep the prefix in `path` as `root_path`."""
    path = request.url.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.rstrip("/")


def request_id_of(request: Request) -> tuple[str, dict[str, str]]:
    """The id that logs carry end to end, and the response headers that echo the client's id.

    Serve's proxy puts `x-request-id` on every request (the client's own, else a fresh one) and
    echoes it on the response, so the header is set here only when no proxy did (a second copy
    would reach clients as "id, id"). Clients may reuse ids while a request is in flight, and the
    engine keys sequences by id, so a short unique suffix follows the client's id.
    """
    suffix = uuid.uuid4().hex[:8]
    given = request.headers.get("x-request-id")
    if given:
        return f"{given}.{suffix}", {}
    request_id = uuid.uuid4().hex
    return f"{request_id}.{suffix}", {"x-request-id": request_id}
