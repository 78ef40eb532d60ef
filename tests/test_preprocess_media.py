"""Safe media fetching against a local aiohttp server on 127.0.0.1 (trusted for the test only)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from internvl_core.errors import MediaError, PayloadTooLargeError
from internvl_core.preprocess.media import MediaFetcher, decode_data_url, is_blocked_address
from internvl_core.serve_args import MediaLimits

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def _server(routes: dict[str, Handler]) -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _limits(**kw: object) -> MediaLimits:
    base = {"trusted_networks": ("127.0.0.1/32",), "fetch_timeout_s": 1.0}
    return MediaLimits.model_validate({**base, **kw})


async def _ok(_: web.Request) -> web.Response:
    return web.Response(body=b"x" * 1000)


async def _big_chunked(_: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(_)
    for _i in range(100):
        await resp.write(b"y" * 10_000)
    return resp


async def _slow(_: web.Request) -> web.Response:
    await asyncio.sleep(2)
    return web.Response(body=b"late")


async def _to_private(_: web.Request) -> web.Response:
    raise web.HTTPFound("http://127.0.0.2:9/secret")


async def _to_metadata(_: web.Request) -> web.Response:
    raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")


def _run(coro: Awaitable[bytes]) -> bytes:
    return asyncio.run(coro)  # type: ignore[arg-type]


def _fetch(
    path: str, limits: MediaLimits, max_bytes: int = 100_000, elapsed: list[float] | None = None
) -> bytes:
    async def go() -> bytes:
        routes = {
            "/ok": _ok,
            "/big": _big_chunked,
            "/slow": _slow,
            "/redirect-private": _to_private,
            "/redirect-metadata": _to_metadata,
        }
        async with _server(routes) as base:
            fetcher = MediaFetcher(limits)
            start = time.perf_counter()
            try:
                return await fetcher.fetch(base + path, max_bytes)
            finally:
                if elapsed is not None:
                    elapsed.append(time.perf_counter() - start)
                await fetcher.close()

    return _run(go())


def test_fetch_from_trusted_local_server() -> None:
    assert _fetch("/ok", _limits()) == b"x" * 1000


def test_untrusted_loopback_refused() -> None:
    with pytest.raises(MediaError, match="blocked"):
        _fetch("/ok", _limits(trusted_networks=()))


def test_redirect_to_private_and_metadata_refused() -> None:
    with pytest.raises(MediaError, match="blocked"):
        _fetch("/redirect-private", _limits())
    with pytest.raises(MediaError, match="blocked"):
        _fetch("/redirect-metadata", _limits())


def test_oversized_stream_refused() -> None:
    with pytest.raises(PayloadTooLargeError, match="100000 bytes"):
        _fetch("/big", _limits())


def test_slow_server_times_out() -> None:
    elapsed: list[float] = []
    with pytest.raises(MediaError, match="timed out"):
        _fetch("/slow", _limits(), elapsed=elapsed)
    assert elapsed[0] < 3


def test_domain_allowlist() -> None:
    with pytest.raises(MediaError, match="allowed_domains"):
        _fetch("/ok", _limits(allowed_domains=("example.com",)))


def test_data_urls() -> None:
    payload = base64.b64encode(b"hello").decode()
    assert decode_data_url(f"data:image/png;base64,{payload}", 100) == b"hello"
    with pytest.raises(MediaError, match="invalid base64"):
        decode_data_url("data:image/png;base64,@@@", 100)
    with pytest.raises(PayloadTooLargeError):
        decode_data_url(f"data:image/png;base64,{'A' * 400}", 100)
    with pytest.raises(MediaError, match="separating"):
        decode_data_url("data:image/png;base64", 100)


def test_schemes_and_local_dir(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abc")
    fetcher = MediaFetcher(_limits(local_media_dir=str(tmp_path)))
    assert _run(fetcher.fetch(str(tmp_path / "a.bin"), 10)) == b"abc"
    with pytest.raises(MediaError, match="allow-listed"):
        _run(fetcher.fetch(str(tmp_path / ".." / "etc"), 10))
    with pytest.raises(MediaError, match="scheme"):
        _run(MediaFetcher(_limits()).fetch("ftp://example.com/x", 10))
    with pytest.raises(MediaError, match="scheme"):
        _run(MediaFetcher(_limits()).fetch("/etc/passwd", 10))


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("8.8.8.8", False),
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("100.64.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("fd00:ec2::254", True),
        ("224.0.0.1", True),
        ("0.0.0.0", True),
    ],
)
def test_blocked_addresses(address: str, blocked: bool) -> None:
    assert is_blocked_address(address) is blocked
