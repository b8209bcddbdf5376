"""The SSRF guard of remote image URLs: private targets refused, also after redirects."""

from __future__ import annotations

import asyncio
import ipaddress

import httpx
import pytest

from bot.remote_images import Address, RemoteImageError, RemoteImageFetcher, is_public
from tests.http_helpers import png


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "224.0.0.1",
    ],
)
def test_private_addresses_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


def test_public_addresses_are_public() -> None:
    assert is_public(ipaddress.ip_address("93.184.216.34"))
    assert is_public(ipaddress.ip_address("2606:4700::1111"))


def resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",
        "http://[::1]/a.png",
        "http://169.254.169.254/latest/meta-data",
        "http://internal.example/a.png",
        "http://mixed.example/a.png",
        "file:///etc/passwd",
        "ftp://x/a.png",
    ],
)
async def test_refused_before_any_connection(url: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("must not connect")

    fetcher = RemoteImageFetcher(
        1_000_000,
        resolver=resolver(
            {"internal.example": ["10.0.0.5"], "mixed.example": ["93.184.216.34", "192.168.0.2"]}
        ),
        transport=httpx.MockTransport(handler),
    )
    with pytest.raises(RemoteImageError):
        await fetcher.fetch(url)


def fake_internet(image: bytes) -> httpx.MockTransport:
    """Public hosts by address: 93.184.216.34 serves an image and redirects; the mock checks the
    connection goes to the address that was checked, with the original Host header."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.host == "93.184.216.34"
        host = request.headers["host"]
        if request.url.path == "/redirect-private":
            return httpx.Response(302, headers={"location": "http://169.254.169.254/latest/meta-data"})
        if request.url.path == "/redirect-name":
            return httpx.Response(301, headers={"location": "http://internal.example/x.png"})
        if request.url.path == "/loop":
            return httpx.Response(302, headers={"location": "/loop"})
        if request.url.path == "/big":
            return httpx.Response(200, content=b"0" * 2_000_000)
        if request.url.path == "/slow":
            raise httpx.ReadTimeout("slow", request=request)
        assert host == "images.example"
        return httpx.Response(200, content=image, headers={"content-type": "image/png"})

    return httpx.MockTransport(handler)


def fetcher_for(image: bytes, **kw: object) -> RemoteImageFetcher:
    table = {"images.example": ["93.184.216.34"], "internal.example": ["10.0.0.5"]}
    return RemoteImageFetcher(1_000_000, resolver=resolver(table), transport=fake_internet(image), **kw)  # type: ignore[arg-type]


async def test_public_image_is_fetched_through_the_checked_address() -> None:
    image = png()
    part = await fetcher_for(image).fetch("http://images.example/cat.png")
    assert part.data == image and part.mime == "image/png" and part.name == "cat.png"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/redirect-private", "private or local"),
        ("/redirect-name", "private or local"),
        ("/loop", "redirected too many times"),
        ("/big", "over the limit"),
        ("/slow", "could not be fetched"),
    ],
)
async def test_redirects_size_and_time_are_guarded(path: str, message: str) -> None:
    with pytest.raises(RemoteImageError, match=message):
        await fetcher_for(png()).fetch(f"http://images.example{path}")


async def test_deadline_for_the_whole_fetch() -> None:
    async def slow_resolver(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["93.184.216.34"]

    fetcher = RemoteImageFetcher(1000, timeout_s=0.2, resolver=slow_resolver)
    with pytest.raises(RemoteImageError, match="did not answer within"):
        await fetcher.fetch("http://images.example/a.png")


def test_policy_can_be_narrowed() -> None:
    def only_one(address: Address) -> bool:
        return str(address) == "93.184.216.34"

    fetcher = RemoteImageFetcher(10, allowed=only_one)
    assert asyncio.run(fetcher.check_target("http://93.184.216.34/x")) == (
        "93.184.216.34",
        "93.184.216.34",
    )
