"""Images from Telegram messages: what counts as an image, size limits, downloads, and the image
an earlier message (a reply target) was about."""

from __future__ import annotations

import asyncio
import logging
import mimetypes
from dataclasses import dataclass

from telegram import Bot, Message
from telegram.error import BadRequest, NetworkError

from bot.adapter import Core
from bot.models import ConversationId, ImagePart, InputRejected, size_text

log = logging.getLogger("vlbot.telegram")

TELEGRAM_DOWNLOAD_LIMIT = 20 * 1024 * 1024  # getFile refuses bigger files
DOWNLOAD_TRIES = 4  # getFile + download, against a Bot API 5xx or a dropped connection
DOWNLOAD_BACKOFF_S = 0.5
IMAGE_EXTENSIONS = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
    ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
    ".heic": "image/heic", ".heif": "image/heif",
}


@dataclass(frozen=True)
class FileRef:
    file_id: str
    size: int | None
    mime: str
    name: str | None


def image_refs(message: Message) -> list[FileRef]:
    """The image a message carries (the largest photo size, or an image document). Raises
    InputRejected("send_an_image") for stickers, videos and other files; [] for plain text."""
    if message.photo:
        best = max(message.photo, key=lambda p: (p.width * p.height, p.file_size or 0))
        return [FileRef(best.file_id, best.file_size, "image/jpeg", None)]
    doc = message.document
    if doc is not None:
        mime = _image_mime(doc.mime_type, doc.file_name)
        if mime is None:
            raise InputRejected("send_an_image", f"document {doc.mime_type} is not an image")
        return [FileRef(doc.file_id, doc.file_size, mime, doc.file_name)]
    if any((message.sticker, message.video, message.animation, message.video_note,
            message.voice, message.audio)):
        raise InputRejected("send_an_image", "not a photo or an image file")
    return []


def _image_mime(mime: str | None, name: str | None) -> str | None:
    if mime and mime.lower().startswith("image/"):
        return mime.lower()
    ext = ("." + name.rsplit(".", 1)[-1].lower()) if name and "." in name else ""
    if ext in IMAGE_EXTENSIONS:  # phones send HEIC as application/octet-stream, too
        return IMAGE_EXTENSIONS[ext]
    guessed = mimetypes.guess_type(name or "")[0]
    return guessed if guessed and guessed.startswith("image/") else None


def check_size(ref: FileRef, max_image_bytes: int) -> None:
    """Refuse, without downloading, a file over Telegram's download limit or over ours."""
    if ref.size is None:
        return
    limit = min(max_image_bytes, TELEGRAM_DOWNLOAD_LIMIT)
    if ref.size > limit:
        raise InputRejected("too_large", f"file of {ref.size} bytes",
                            size=size_text(ref.size), limit=size_text(limit))


async def download(
    bot: Bot, ref: FileRef, max_image_bytes: int,
    *, tries: int = DOWNLOAD_TRIES, backoff_s: float = DOWNLOAD_BACKOFF_S,
) -> ImagePart:
    """getFile, then the file itself. Both are idempotent reads: a network error or a 5xx
    (PTB raises NetworkError for both) is retried with backoff (backoff_s, 2x, 4x ...) before the
    error reaches the user; a refusal (BadRequest: bad file id, file too big) is not retried."""
    check_size(ref, max_image_bytes)
    for attempt in range(1, tries + 1):
        try:
            file = await bot.get_file(ref.file_id)
            data = bytes(await file.download_as_bytearray())
            break
        except BadRequest:
            raise
        except NetworkError as exc:
            if attempt == tries:
                raise
            delay = backoff_s * 2 ** (attempt - 1)
            log.info("telegram: file download failed (%s), try %d of %d in %.1f s",
                     exc.message, attempt + 1, tries, delay)
            await asyncio.sleep(delay)
    check_size(FileRef(ref.file_id, len(data), ref.mime, ref.name), max_image_bytes)
    return ImagePart(data, ref.mime, ref.name)


async def images_of_earlier_message(
    core: Core, conversation: ConversationId, message_id: int
) -> list[ImagePart]:
    """The images a job for an earlier message was about, found through the job whose origin
    names that message (the user's question, the bot's placeholder or an answer part): the job's
    own images, or else those of the latest earlier job in the conversation that had any.
    Survives restarts: it reads the jobs and images stored in SQLite. [] if unknown or reset."""
    return await core.images_for_reply(conversation, message_id)


async def latest_image_sha(core: Core, conversation: ConversationId) -> str | None:
    for turn in reversed(await core.history.recent(conversation)):
        if turn.images:
            return turn.images[-1].sha256
    return None
