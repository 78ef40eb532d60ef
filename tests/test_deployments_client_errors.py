"""Tests for deployments/client_errors.py: Serve's "Request failed." record of a client error
(4xx) becomes one INFO line naming status, type, param and message; server errors keep their
traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from ray.exceptions import RayTaskError
from ray.serve._private.constants import SERVE_LOGGER_NAME

from deployments.client_errors import OneLineClientErrors, log_client_errors_in_one_line
from internvl_core.errors import ContextLengthError, EngineDeadError, MediaError


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(logging.Formatter("%(levelname)s %(message)s").format(record))


@pytest.fixture
def serve_log() -> Iterator[_Records]:
    """Serve's logger as a replica has it, with the filter installed and a capturing handler."""
    logger = logging.getLogger(SERVE_LOGGER_NAME)
    handler = _Records()
    old_filters, old_level = list(logger.filters), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    log_client_errors_in_one_line()
    log_client_errors_in_one_line()  # idempotent
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = old_filters
        logger.setLevel(old_level)


def _fail(exc: BaseException) -> None:
    """What Serve's replica wrapper does with an exception a deployment method raised."""
    try:
        raise exc
    except BaseException:
        logging.getLogger(SERVE_LOGGER_NAME).exception("Request failed.")


def test_filter_installed_once(serve_log: _Records) -> None:
    filters = logging.getLogger(SERVE_LOGGER_NAME).filters
    assert sum(isinstance(f, OneLineClientErrors) for f in filters) == 1


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            MediaError("media host '10.1.2.3' is a blocked (private) address", param="url"),
            "400 invalid_media (url): media host '10.1.2.3' is a blocked (private) address",
        ),
        (MediaError("image could not be decoded: x"), "400 invalid_media: image could not"),
        (
            ContextLengthError("max_tokens 9000 alone fills", param="max_tokens"),
            "400 context_length_exceeded (max_tokens): max_tokens 9000",
        ),
    ],
)
def test_client_error_is_one_info_line(
    serve_log: _Records, error: Exception, expected: str
) -> None:
    _fail(error)
    (record,) = serve_log.records
    (line,) = serve_log.lines
    assert record.levelno == logging.INFO
    assert record.exc_info is None
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("INFO Request refused: ") and expected in line


def test_client_error_wrapped_by_ray_is_one_line(serve_log: _Records) -> None:
    wrapped = RayTaskError("prepare", "Traceback ...", MediaError("not an image"))
    _fail(wrapped)
    (line,) = serve_log.lines
    assert line == "INFO Request refused: 400 invalid_media: not an image"


@pytest.mark.parametrize("error", [EngineDeadError("stage died"), RuntimeError("bug")])
def test_server_errors_keep_their_traceback(serve_log: _Records, error: Exception) -> None:
    _fail(error)
    (record,) = serve_log.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[1] is error
    assert "Traceback" in logging.Formatter().format(record)
