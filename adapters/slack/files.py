"""Slack files: which attachments are images (the others are skipped and named in the reply),
downloading url_private with the bot token, Slack file links, and finding the latest image in a
channel's history (for the slash command).

The bot token goes only to Slack's own https hosts (slack.com and its subdomains, port 443) or to
exactly the configured Web API origin (VLBOT_SLACK__BASE_URL: scheme, host and port), never to a
URL a file or a user names elsewhere.

A missing `files:read` scope does not produce an error status: Slack answers the download with a
200 HTML login page. That page is recognised and turned into a message naming the scope.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.models import ImagePart, InputRejected, size_text

log = logging.getLogger("vlbot.slack.files")

# A file id in a Slack file URL: /files/U123/F0ABC/name (permalink), /files-pri/T123-F0ABC/name.
FILE_ID_RE = re.compile(r"(?:^|[/-])(F[A-Z0-9]{8,})(?=/|$)")
Origin = tuple[str, str, int]


def image_files(files: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The attachments that claim to be images (their bytes are checked later by the engine)."""
    return [f for f in files or [] if is_image(f)]


def is_image(file: dict[str, Any]) -> bool:
    return str(file.get("mimetype", "")).startswith("image/")


def is_other_file(file: dict[str, Any]) -> bool:
    """A file known not to be an image (a PDF, a text snippet...); one of unknown type is not."""
    return bool(file.get("mimetype")) and not is_image(file)


def file_name(file: dict[str, Any]) -> str:
    """A file's name for a reply (never a lone surrogate from a hostile event)."""
    name = str(file.get("name") or file.get("title") or "that file")
    return name.encode("utf-8", "replace").decode("utf-8")


def origin_of(url: str) -> Origin | None:
    """(scheme, host, port) of a URL, with the scheme's default port filled in."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


class SlackFiles:
    """Downloads Slack-hosted files; the bot token is only ever sent to Slack's own hosts."""

    def __init__(
        self, client: AsyncWebClient, bot_token: str, max_bytes: int, max_images: int,
        own_base_url: str | None = None, timeout_s: float = 30.0,
    ) -> None:
        self._client = client
        self._token = bot_token
        self.max_bytes = max_bytes
        self.max_images = max_images
        self._own_origin = origin_of(own_base_url) if own_base_url else None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def is_slack_url(self, url: str) -> bool:
        """May the bot token go to this URL: Slack's https hosts or the configured origin only."""
        origin = origin_of(url)
        if origin is None:
            return False
        if self._own_origin is not None and origin == self._own_origin:
            return True
        scheme, host, port = origin
        return scheme == "https" and port == 443 and (host == "slack.com" or host.endswith(".slack.com"))

    def file_link(self, url: str) -> dict[str, Any] | None:
        """A Slack file link (permalink or url_private) as a file stub for `download`; None when
        the URL is not a Slack file link."""
        found = FILE_ID_RE.search(urlsplit(url).path)
        if not self.is_slack_url(url) or found is None:
            return None
        name = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
        return {"id": found.group(1), "name": name, "file_access": "check_file_info"}

    async def sort_out(self, files: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], list[str]]:
        """A message's attachments to read as images, and the names of those skipped as not images.
        A stub without a type (`file_access: check_file_info`) is looked up with files.info first."""
        wanted: list[dict[str, Any]] = []
        skipped: list[str] = []
        for file in files or []:
            if not file.get("mimetype") and file.get("file_access") == "check_file_info":
                file = await self._file_info(file)
            if is_other_file(file):
                skipped.append(file_name(file))
            else:
                wanted.append(file)
        return wanted, skipped

    async def images_of(self, wanted: list[dict[str, Any]]) -> tuple[ImagePart, ...]:
        """Download the attachments `sort_out` wants (files without a URL are explained)."""
        if len(wanted) > self.max_images:
            raise InputRejected(
                "too_many_images", f"{len(wanted)} images", count=len(wanted), limit=self.max_images
            )
        return tuple([await self.download(f) for f in wanted])

    async def _file_info(self, file: dict[str, Any]) -> dict[str, Any]:
        """Events may carry a stub (`file_access: check_file_info`); files.info has the rest."""
        if file.get("url_private") and file.get("file_access") != "check_file_info":
            return file
        try:
            resp = await self._client.files_info(file=file["id"])
        except SlackApiError as exc:
            error = str(exc.response.get("error", ""))
            if error == "missing_scope":
                raise InputRejected("slack_files_scope", "files.info: missing_scope") from exc
            raise InputRejected(
                "slack_download_failed", f"files.info: {error}", name=file_name(file), status=error
            ) from exc
        info: dict[str, Any] = resp["file"]
        return info

    async def download(self, file: dict[str, Any]) -> ImagePart:
        info = await self._file_info(file)
        name = file_name(info)
        url = str(info.get("url_private_download") or info.get("url_private") or "")
        if not url or not self.is_slack_url(url):
            # external (Google Drive...) files, or files hidden from the bot: nothing to fetch here
            log.info("file %s: no Slack download URL (external: %s)", info.get("id"), info.get("is_external"))
            raise InputRejected("slack_file_no_url", "no Slack file URL", name=name)
        try:
            data, content_type = await self._fetch(url, info, name)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("file %s: download failed: %s", info.get("id"), type(exc).__name__)
            timed_out = isinstance(exc, asyncio.TimeoutError)
            raise InputRejected(
                "slack_download_failed", type(exc).__name__, name=name,
                status="the download timed out" if timed_out else "the connection broke off",
            ) from exc
        mime = str(info.get("mimetype") or content_type or "application/octet-stream")
        return ImagePart(data, mime, name if info.get("name") else None)

    async def _fetch(self, url: str, info: dict[str, Any], name: str) -> tuple[bytes, str]:
        """The file's bytes and content type; the bot token goes along (aiohttp drops it when a
        redirect leaves the origin)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Authorization": f"Bearer {self._token}"}
        async with self._session.get(url, headers=headers) as resp:
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if resp.status != 200:
                log.warning("file %s: download answered HTTP %d", info.get("id"), resp.status)
                raise InputRejected(
                    "slack_download_failed", f"HTTP {resp.status}", name=name, status=f"HTTP {resp.status}"
                )
            if content_type == "text/html":
                log.warning("file %s: Slack sent an HTML page (files:read scope missing?)", info.get("id"))
                raise InputRejected("slack_files_scope", "HTML instead of file bytes")
            data = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                data.extend(chunk)
                if len(data) > self.max_bytes:
                    size = max(len(data), int(info.get("size") or 0))
                    raise InputRejected(
                        "too_large", "file over the limit",
                        size=size_text(size), limit=size_text(self.max_bytes),
                    )
        return bytes(data), content_type


async def latest_image_file(client: AsyncWebClient, channel: str, limit: int = 100) -> dict[str, Any] | None:
    """The newest image attachment in a channel's or DM's recent history (None if there is none).
    Raises SlackApiError (e.g. `not_in_channel`) for the caller to explain."""
    resp = await client.conversations_history(channel=channel, limit=limit)
    for message in resp.get("messages") or []:
        found = image_files(message.get("files"))
        if found:
            return found[0]
    return None
