"""Auto-triage groups, and posts of the triage workflow into other chats.

In a group named in `settings.triage.telegram_chats` or turned on by an admin (`/autotriage on`;
bot/triage/places.py, looked up for each image in a group), every photo or image file (an album counts
once), no mention needed, is triaged with the `triage` preset and answered as a reply to it. The
job's origin carries preset="triage", auto_triage=True and `link`: the message's t.me link
(t.me/<username>/<id> for a public group, t.me/c/<id>/<id> for a private supergroup; None for a
basic group, which has no message links). Each image is its own conversation, so one triage never
sees another's screenshot in its history. Text without an image is left alone; a mention or a
reply to the bot is an ordinary question, as in any group. The bot sees unaddressed messages
only with privacy mode off (@BotFather, /setprivacy) or as an admin of the group: the adapter
warns at start when privacy mode is on and auto-triage groups are set.

`post` is the triage workflow's way out (routing to an on-call chat, the daily digest): plain
text into any chat the bot is in, answered with the new message's link.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

from telegram import Bot, Message

from adapters.telegram.ledger import ChatLedger
from adapters.telegram.media import image_refs
from adapters.telegram.replies import split_message
from bot.models import ConversationId, InputRejected
from bot.triage.places import AutoTriagePlaces
from bot.triage.rules import Place
from bot.triage.workflow import TRIAGE_PRESET

log = logging.getLogger("vlbot.telegram.triage")


def _has_image(msg: Message) -> bool:
    try:
        return bool(image_refs(msg))
    except InputRejected:  # a sticker, a video, a PDF: not a screenshot
        return False


class TelegramTriage:
    def __init__(self, places: AutoTriagePlaces) -> None:
        self.places = places  # settings' and those admins turn on (/autotriage)

    async def wants(self, messages: Sequence[Message]) -> bool:
        """A message (or album) with an image in an auto-triage group (the image is looked at
        first: text is never looked up)."""
        return any(_has_image(m) for m in messages) and await self.places.covers(
            Place("telegram", str(messages[0].chat.id)))

    @staticmethod
    def screenshots(messages: Sequence[Message]) -> list[Message]:
        """The parts of an album to triage: those with an image (a video beside them is not
        refused, it is left out)."""
        return [m for m in messages if _has_image(m)]

    @staticmethod
    def conversation_of(msg: Message) -> ConversationId:
        """One conversation per triaged message (in a forum, inside its topic's key)."""
        thread = msg.message_thread_id if msg.is_topic_message and msg.chat.is_forum else None
        prefix = f"{thread}:" if thread is not None else ""
        return ConversationId("telegram", str(msg.chat.id), f"{prefix}triage:{msg.message_id}")

    @staticmethod
    def origin_of(msg: Message) -> dict[str, Any]:
        return {"preset": TRIAGE_PRESET, "auto_triage": True, "link": msg.link}


def warn_if_privacy_on(bot: Bot, chats: Collection[int]) -> None:
    """Auto-triage needs every group message; with privacy mode on Telegram sends only those
    that address the bot (unless the bot is an admin of the group)."""
    if chats and not bot.can_read_all_group_messages:
        log.warning("telegram: privacy mode is on, so in the auto-triage groups (%s) the bot sees "
                    "only messages addressed to it unless it is an admin there: turn it off "
                    "(@BotFather: /setprivacy, Disable; then remove and add the bot to each "
                    "group again) or make the bot an admin of those groups",
                    ", ".join(str(c) for c in chats))


async def post_text(bot: Bot, ledger: ChatLedger, chat: str, text: str) -> str | None:
    """Send plain text (no parse mode) to `chat`, split at Telegram's limit; the first message's
    link (None in a private chat or a basic group). Raises TelegramError if Telegram refuses."""
    chat_id = int(chat)
    link: str | None = None
    for i, piece in enumerate(split_message(text)):
        async with ledger.sending(chat_id):
            sent = await bot.send_message(chat_id, piece)
        await ledger.sent(chat_id, sent.message_id)
        if i == 0:
            link = sent.link
    return link
