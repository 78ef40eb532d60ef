"""Reading a body under the limit (refused while reading, or at once from Content-Length) and
decoding a large body off the event loop."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.request_body import decode_chat_request, parse_chat_request, read_body
from internvl_core.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    RequestSchemaError,
)
from tests.ingress_fakes import chat_body, chunked_request


def test_body_within_the_limit_is_read_whole() -> None:
    request, pulled = chunked_request([b"ab", b"cd", b"e"])
    assert asyncio.run(read_body(request, limit=5)) == b"abcde"
    assert pulled == [2, 2, 1]


def test_reading_stops_at_the_chunk_that_passes_the_limit() -> None:
    request, pulled = chunked_request([b"x" * 10] * 100)
    with pytest.raises(PayloadTooLargeError, match="limit is 25 bytes"):
        asyncio.run(read_body(request, limit=25))
    assert pulled == [10, 10, 10]


def test_declared_length_over_the_limit_reads_nothing() -> None:
    request, pulled = chunked_request([b"x" * 10], headers={"content-length": "26"})
    with pytest.raises(PayloadTooLargeError) as info:
        asyncio.run(read_body(request, limit=25))
    assert info.value.status_code == 413 and pulled == []


def test_malformed_content_length_is_a_400() -> None:
    request, _ = chunked_request([b"{}"], headers={"content-length": "ten"})
    with pytest.raises(InvalidRequestError, match="content-length"):
        asyncio.run(read_body(request, limit=25))


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{", InvalidRequestError),
        (b"[1]", InvalidRequestError),
        (b'{"model": "m"}', RequestSchemaError),
    ],
)
def test_decode_errors(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_chat_request(body)


def test_large_body_is_decoded_off_the_event_loop() -> None:
    """While a large body decodes, other work on the loop goes on and ends first."""
    messages = [{"role": "user", "content": "x" * 50}] * 40_000  # about 3 MB
    body = json.dumps(chat_body(messages=messages)).encode()
    order: list[str] = []

    async def decode() -> None:
        parsed = await parse_chat_request(body)
        assert len(parsed.messages) == 40_000
        order.append("large")

    async def other() -> None:
        order.append("other")

    async def go() -> None:
        large = asyncio.create_task(decode())
        await asyncio.sleep(0)  # the decode has started (inline, it would run to its end here)
        await other()
        await large

    asyncio.run(go())
    assert order == ["other", "large"]


def test_small_body_is_decoded_inline() -> None:
    parsed = asyncio.run(parse_chat_request(json.dumps(chat_body()).encode()))
    assert parsed.messages[0].content == "hi"
