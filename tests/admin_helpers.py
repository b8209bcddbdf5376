"""Helpers for the admin, quota and usage tests: messages from a chosen user, a small real PNG,
waiting for the ledger (the runner writes a refused message's row in the background)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable

from PIL import Image

from bot.adapter import Incoming
from bot.models import ConversationId, ImagePart, Message, User


def png(shade: int = 0) -> ImagePart:
    """A real 32x32 PNG (`shade` makes each one different)."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (shade % 256, 40, 90)).save(buffer, "PNG")
    return ImagePart(buffer.getvalue(), "image/png", f"shot{shade}.png")


def ask(
    user: str,
    text: str = "what is this?",
    images: int = 0,
    chat: str | None = None,
    platform: str = "telegram",
    lang: str | None = None,
) -> Incoming:
    """A message of `user` in `chat` (default: the user's private chat) on `platform`."""
    return Incoming(
        conversation=ConversationId(platform, chat or user),
        user=User(platform_id=user, display_name=f"name of {user}", language_code=lang),
        message=Message.of(text, *(png(i) for i in range(images))),
        origin={"chat": chat or user},
    )


async def until(condition: Callable[[], Awaitable[bool]], what: str, limit_s: float = 20.0) -> None:
    """Wait until the async condition holds (polled), failing with `what` after `limit_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
