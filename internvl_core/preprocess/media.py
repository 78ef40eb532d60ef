"""Fetch media bytes safely: data: URLs, http(s) with SSRF protection, allow-listed local files.

In: a URL and `MediaLimits`. Out: bytes, or a MediaError / PayloadTooLargeError naming the limit.
The resolver refuses private, loopback, link-local, multicast, reserved and metadata addresses and
aiohttp connects only to the addresses it returned, so DNS rebinding has no window; redirects are
followed by hand and every hop is checked again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import socket
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from internvl_core.errors import MediaError, PayloadTooLargeError
from internvl_core.serve_args import MediaLimits

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_CHUNK = 1 << 16
# Shared address space (CGNAT) and the cloud metadata addresses are not "private" to ipaddress.
_EXTRA_BLOCKED = (
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fd00:ec2::/32"),
)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_blocked_address(address: str, trusted: tuple[Network, ...] = ()) -> bool:
    """True for addresses a server must never fetch from on a user's behalf."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in trusted if net.version == ip.version):
        return False
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or any(ip in net for net in _EXTRA_BLOCKED if net.version == ip.version)
    )


class GuardedResolver(AbstractResolver):
    """Resolves with the system resolver, then drops every blocked address."""

    def __init__(self, trusted: tuple[Network, ...]) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._trusted = trusted

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not is_blocked_address(r["host"], self._trusted)]
        if not allowed:
            raise MediaError(f"media host {host!r} resolves only to blocked (private) addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def decode_data_url(url: str, max_bytes: int, *, limit_name: str = "max_bytes") -> bytes:
    """`data:[mime][;base64],payload` -> bytes; size checked before decoding."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError("data: URL has no ',' separating header and payload")
    if header.endswith(";base64"):
        if len(payload) * 3 // 4 > max_bytes:
            raise PayloadTooLargeError(
                f"data: URL decodes to about {len(payload) * 3 // 4} bytes; "
                f"{limit_name} limit is {max_bytes}"
            )
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"data: URL has invalid base64: {e}") from e
    data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"data: URL has {len(data)} bytes; {limit_name} limit is {max_bytes}"
        )
    return data


class MediaFetcher:
    """One per replica: a shared connection pool and a concurrency limit."""

    def __init__(self, limits: MediaLimits) -> None:
        self.limits = limits
        self._session: aiohttp.ClientSession | None = None
        self._semaphore = asyncio.Semaphore(limits.max_concurrent_fetches)
        self.bytes_fetched = 0
        self._trusted = tuple(ipaddress.ip_network(n) for n in limits.trusted_networks)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self._trusted),
                limit=self.limits.max_concurrent_fetches,
            )
            timeout = aiohttp.ClientTimeout(
                total=self.limits.fetch_timeout_s,
                sock_connect=self.limits.fetch_timeout_s,
                sock_read=self.limits.fetch_timeout_s,
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str, max_bytes: int, *, limit_name: str = "max_bytes") -> bytes:
        """Bytes of a data:, http(s):, file: URL or allow-listed path; size errors name
        `limit_name` (the knob that sets `max_bytes`) and its value."""
        if url.startswith("data:"):
            return decode_data_url(url, max_bytes, limit_name=limit_name)
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            async with self._semaphore:
                data = await self._fetch_http(url, max_bytes, limit_name)
            self.bytes_fetched += len(data)
            return data
        if scheme in ("file", "") and self.limits.local_media_dir is not None:
            return self._read_local(url, max_bytes, limit_name)
        raise MediaError(
            f"media URL scheme {scheme or 'path'!r} is not allowed; use https://, http:// or data:"
        )

    def _read_local(self, url: str, max_bytes: int, limit_name: str) -> bytes:
        root = Path(self.limits.local_media_dir or "").resolve()
        path = Path(urlsplit(url).path if url.startswith("file:") else url).resolve()
        if not path.is_relative_to(root):
            raise MediaError(f"local media must be under the allow-listed directory {root}")
        if not path.is_file():
            raise MediaError(f"local media file {path.name!r} does not exist")
        if path.stat().st_size > max_bytes:
            raise PayloadTooLargeError(
                f"media file has {path.stat().st_size} bytes; {limit_name} limit is {max_bytes}"
            )
        return path.read_bytes()

    def _check_host(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MediaError(f"redirect to {url!r} is not an http(s) URL")
        host = parts.hostname.lower()
        allowed = self.limits.allowed_domains
        if allowed and not any(host == d or host.endswith("." + d) for d in allowed):
            raise MediaError(f"media host {host!r} is not in allowed_domains")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return
        if is_blocked_address(str(literal), self._trusted):
            raise MediaError(f"media host {host!r} is a blocked (private) address")

    async def _fetch_http(self, url: str, max_bytes: int, limit_name: str) -> bytes:
        session = self._get_session()
        for _ in range(MAX_REDIRECTS + 1):
            self._check_host(url)
            try:
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308):
                        url = urljoin(url, resp.headers.get("Location", ""))
                        continue
                    if resp.status != 200:
                        raise MediaError(f"fetching media returned HTTP {resp.status}")
                    return await _read_limited(resp, max_bytes, limit_name)
            except TimeoutError as e:
                raise MediaError(
                    f"fetching media timed out after {self.limits.fetch_timeout_s} s "
                    "(fetch_timeout_s)"
                ) from e
            except aiohttp.ClientError as e:
                raise MediaError(f"fetching media failed: {type(e).__name__}: {e}") from e
        raise MediaError(f"media URL redirected more than {MAX_REDIRECTS} times")


async def _read_limited(resp: Any, max_bytes: int, limit_name: str) -> bytes:
    declared = resp.content_length
    if declared is not None and declared > max_bytes:
        raise PayloadTooLargeError(f"media has {declared} bytes; {limit_name} limit is {max_bytes}")
    chunks, total = [], 0
    async for chunk in resp.content.iter_chunked(_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLargeError(
                f"media is larger than {max_bytes} bytes; {limit_name} limit is {max_bytes}"
            )
        chunks.append(chunk)
    return b"".join(chunks)
