"""Fetching http(s) image URLs (the HTTP API's `image_url`, links in a Slack command) without
becoming an SSRF proxy.

Every hop (the first URL and each redirect) is resolved first and refused unless all of its
addresses are public (no loopback, private, link-local, multicast, reserved or unspecified ones,
IPv4-mapped IPv6 included). The connection then goes to the address that was checked (the host
name is kept for the Host header and TLS), so a DNS answer that changes between the check and the
connection cannot redirect it. The body is counted while it streams and cut at the size limit,
and the whole fetch has one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from bot.models import ImagePart, size_text

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]


class RemoteImageError(Exception):
    """A remote image that may not or could not be fetched; the message is for the user."""


def is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def pinned_request(
    client: httpx.AsyncClient, method: str, url: str, host: str, address: str, **kw: Any
) -> httpx.Request:
    """A request to `url` that connects to the checked `address` (the Host header and TLS name
    stay `host`'s): a DNS answer changing after the check cannot redirect it."""
    parts = urlsplit(url)
    pinned = parts._replace(
        netloc=(f"[{address}]" if ":" in address else address) + (f":{parts.port}" if parts.port else "")
    ).geturl()
    headers = {**kw.pop("headers", {}), "Host": parts.netloc.rsplit("@", 1)[-1]}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return client.build_request(method, pinned, headers=headers, extensions=extensions, **kw)


class RemoteImageFetcher:
    def __init__(
        self,
        max_bytes: int,
        *,
        timeout_s: float = 10.0,
        max_redirects: int = 3,
        resolver: Resolver = system_resolver,
        allowed: Callable[[Address], bool] = is_public,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self._resolve = resolver
        self._allowed = allowed
        self._transport = transport

    async def check_target(self, url: str, what: str = "image") -> tuple[str, str]:
        """Validate one hop; returns (host, the checked address to connect to). `what` names
        the URL's use in the messages (the image URL, the webhook URL)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteImageError(f"Only http(s) {what} URLs are accepted, not {parts.scheme or url!r}.")
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                addresses = [ipaddress.ip_address(a.split("%")[0]) for a in await self._resolve(host, port)]
            except OSError as exc:
                raise RemoteImageError(f"The {what} host {host!r} could not be resolved.") from exc
        if not addresses or not all(self._allowed(a) for a in addresses):
            raise RemoteImageError(
                f"The {what} URL points to a private or local address ({host}); it is not fetched."
            )
        return host, str(addresses[0])

    async def fetch(self, url: str) -> ImagePart:
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout_s)
        except asyncio.TimeoutError:
            raise RemoteImageError(f"The image URL did not answer within {self.timeout_s:.0f} s.") from None
        except httpx.HTTPError as exc:
            raise RemoteImageError(f"The image URL could not be fetched ({type(exc).__name__}).") from exc

    async def _fetch(self, url: str) -> ImagePart:
        async with httpx.AsyncClient(
            follow_redirects=False, transport=self._transport, timeout=self.timeout_s
        ) as client:
            for _ in range(self.max_redirects + 1):
                host, address = await self.check_target(url)
                parts = urlsplit(url)
                request = pinned_request(client, "GET", url, host, address)
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise RemoteImageError(
                            f"The image URL answered HTTP {response.status_code}."
                        )
                    return ImagePart(
                        await self._read_limited(response),
                        response.headers.get("content-type", "application/octet-stream").split(";")[0],
                        parts.path.rsplit("/", 1)[-1] or None,
                    )
                finally:
                    await response.aclose()
            raise RemoteImageError("The image URL redirected too many times.")

    async def _read_limited(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise RemoteImageError(self._too_large())
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > self.max_bytes:
                raise RemoteImageError(self._too_large())
        return bytes(data)

    def _too_large(self) -> str:
        return f"The remote image is over the limit of {size_text(self.max_bytes)}."
