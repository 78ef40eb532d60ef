"""Expected client errors (InternVLError 4xx: a blocked media host, an undecodable image, a
prompt over the context) logged as one line with the request id, not as a traceback.

In: the log records of a replica process. Out: Serve's "Request failed." record of a client
error rewritten to one INFO line; every other record, 5xx errors included, untouched.
"""

from __future__ import annotations

import logging

from ray.serve._private.constants import SERVE_LOGGER_NAME

from internvl_core.errors import InternVLError


def client_error(exc: BaseException | None) -> InternVLError | None:
    """`exc` (or the cause Ray wrapped it around) when it is a client's mistake (4xx)."""
    for _ in range(8):
        if exc is None:
            return None
        if isinstance(exc, InternVLError):
            return exc if 400 <= exc.status_code < 500 else None
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def describe(error: InternVLError) -> str:
    """`400 invalid_media (messages[0].content[1].image_url.url): media host ... is blocked`."""
    param = f" ({error.param})" if error.param else ""
    return f"{error.status_code} {error.error_type}{param}: {error.message}"


class OneLineClientErrors(logging.Filter):
    """Rewrites a record carrying a client error's traceback into a one-line INFO record.

    Serve's replica wrapper logs every exception a deployment method raises with
    `logger.exception("Request failed.")`; its formatter prefixes the request id.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = client_error(record.exc_info[1] if record.exc_info else None)
        if error is not None:
            record.msg, record.args = "Request refused: %s", (describe(error),)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def log_client_errors_in_one_line() -> None:
    """Install the filter on Serve's logger in this process (once; replicas call it at start)."""
    serve_logger = logging.getLogger(SERVE_LOGGER_NAME)
    if not any(isinstance(f, OneLineClientErrors) for f in serve_logger.filters):
        serve_logger.addFilter(OneLineClientErrors())
