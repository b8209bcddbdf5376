"""Telegram updates → `Incoming` turns: access, addressing in groups, rate limits, albums,
images, commands. Handlers only validate, download and submit; they never wait for an answer.

Every update is pending in SQLite from before Telegram's acknowledgement until `settle` (see
adapters.telegram.durable): a handler settles its update when the job is written or the user got
a reply; an album settles its parts when the album's job is written.

/cancel covers everything the chat sent before it: it sets a barrier (the /cancel's message id)
for the conversation, then cancels the queued and running jobs under the chat's lock. A message
older than the barrier that is still downloading, waiting for the lock or inside its album's
collection window is dropped (and told "Cancelled.") when it reaches the lock; one already
submitting finishes first, inside the lock, and is then cancelled with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from telegram import Bot, InputFile, Message, MessageEntity, ReplyParameters, Update
from telegram.constants import ChatType
from telegram.error import TelegramError
from telegram.ext import ContextTypes

from adapters.telegram.admin_commands import ADMIN_COMMANDS, TelegramAdminCommands, is_admin_command
from adapters.telegram.auto_triage import TelegramTriage
from adapters.telegram.durable import DurableUpdateQueue
from adapters.telegram.ledger import ChatLedger
from adapters.telegram.media import (
    FileRef,
    check_size,
    download,
    image_refs,
    images_of_earlier_message,
    latest_image_sha,
)
from bot import texts
from bot.adapter import Core, Incoming, QueueFull
from bot.export import to_markdown
from bot.models import ConversationId, ImagePart, InputRejected, User, size_text
from bot.models import Message as TurnMessage
from bot.presets import get_preset, preset_names
from bot.settings import Settings

log = logging.getLogger("vlbot.telegram")

Context = ContextTypes.DEFAULT_TYPE
# The commands of the bot menu (registered with setMyCommands by the adapter), in /help order.
COMMAND_NAMES = ("ask", "help", "reset", "cancel", "export", "usage", "start")


@dataclass
class Album:
    messages: list[Message] = field(default_factory=list)
    update_ids: list[int] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class RateLimiter:
    """N messages per user per minute; the refusal is sent once per window, not per message."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: dict[int, deque[float]] = {}
        self._told_until: dict[int, float] = {}

    def check(self, user_id: int, now: float | None = None) -> tuple[bool, int, bool]:
        """(allowed, seconds to wait, whether to tell the user)."""
        if self.per_minute <= 0:
            return True, 0, False
        now = time.monotonic() if now is None else now
        seen = self._seen.setdefault(user_id, deque())
        while seen and seen[0] <= now - 60:
            seen.popleft()
        if len(seen) < self.per_minute:
            seen.append(now)
            return True, 0, False
        wait = max(1, math.ceil(seen[0] + 60 - now))
        tell = self._told_until.get(user_id, 0.0) <= now
        if tell:
            self._told_until[user_id] = now + wait
        return False, wait, tell


class Handlers:
    def __init__(self, settings: Settings, bot: Bot, core: Core, *, album_wait_s: float,
                 queue: DurableUpdateQueue, ledger: ChatLedger) -> None:
        self.settings = settings
        self.tg = settings.telegram
        self.bot = bot
        self.core = core
        self.album_wait_s = album_wait_s
        self.queue = queue
        self.ledger = ledger
        self.admin_commands = TelegramAdminCommands(core, bot.id)  # /allow /deny /quota /usage
        self.triage = TelegramTriage(core.admin.auto_triage)  # settings' and admins' groups
        self.rate = RateLimiter(self.tg.rate_limit_per_minute)
        self.albums: dict[tuple[int, str], Album] = {}
        # handlers run concurrently (block=False); a chat's messages are turned into jobs one at
        # a time, in arrival order, so a quick "and the total?" never overtakes its photo
        self._chat_locks: dict[int, asyncio.Lock] = {}
        # conversation key → message id of its latest /cancel: older messages are dropped
        self._cancel_before: dict[str, int] = {}
        # conversation key → ids of its messages being handled (downloading, waiting, in albums)
        self._in_hand: dict[str, set[int]] = {}

    async def close(self) -> None:
        """Stop collecting albums; their parts stay pending and are handled after a restart."""
        for album in self.albums.values():
            if album.task is not None:
                album.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await album.task
        self.albums.clear()

    # --- PTB callbacks -----------------------------------------------------------------------

    async def on_message(self, update: Update, _: Context) -> None:
        msg = update.message
        if msg is None or msg.from_user is None or msg.from_user.is_bot:
            await self.queue.settle(update.update_id)
            return
        self.ledger.note_incoming(msg.chat.id, msg.message_id, msg.date)
        if msg.media_group_id:  # albums: addressing and admission once, for the whole group
            self._collect_album(msg, update.update_id)
            return
        key = conversation_of(msg).key()
        self._in_hand.setdefault(key, set()).add(msg.message_id)
        try:
            await self._message(msg, update.update_id)
        finally:
            self._release(key, [msg.message_id])
        await self.queue.settle(update.update_id)

    def _release(self, key: str, message_ids: list[int]) -> None:
        in_hand = self._in_hand.get(key, set())
        in_hand.difference_update(message_ids)
        if not in_hand:
            self._in_hand.pop(key, None)

    async def _message(self, msg: Message, update_id: int) -> None:
        # an album that started before this message goes first
        earlier = [a.task for k, a in self.albums.items() if k[0] == msg.chat.id and a.task]
        for task in earlier:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(task)
        async with self._chat_lock(msg.chat.id):
            if await self._dropped_by_cancel([msg]) or await self._invalid_text([msg]):
                return
            addressed, question = self._addressed(msg)
            if not addressed and await self.triage.wants([msg]):  # an image in an auto-triage group
                if await self._admit(msg, quietly=True):
                    await self._turn([msg], question, f"telegram:update:{update_id}", triage=True)
                return
            unknown = self._unknown_command(msg)
            if unknown is not None:
                if (addressed or unknown[1]) and await self._admit(msg):
                    await self._say_unknown(msg, unknown[0])
                return
            if not addressed or not await self._admit(msg):
                return
            await self._turn([msg], question, f"telegram:update:{update_id}")

    def _chat_lock(self, chat_id: int) -> asyncio.Lock:
        for idle in [c for c, lock in self._chat_locks.items() if not lock.locked()]:
            if idle != chat_id:
                del self._chat_locks[idle]
        return self._chat_locks.setdefault(chat_id, asyncio.Lock())

    async def on_command(self, update: Update, context: Context) -> None:
        msg = update.message
        if msg is not None and msg.from_user is not None and msg.text:
            self.ledger.note_incoming(msg.chat.id, msg.message_id, msg.date)
            await self._command(msg)
        await self.queue.settle(update.update_id)

    async def _command(self, msg: Message) -> None:
        assert msg.text is not None
        if not await self._allowed(msg):
            await self._say(msg, "not_allowed")
            return
        command = msg.text.split()[0].lstrip("/").split("@")[0].lower()
        conversation = conversation_of(msg)
        if command in ("start", "help"):
            lang = msg.from_user.language_code if msg.from_user else None
            await self._say_text(msg, texts.text(
                "help", lang, model=self.core.status().model, presets=_presets(),
                limit=size_text(self.settings.max_image_bytes),
            ) + self.admin_commands.help_lines(msg))
        elif is_admin_command(command):
            await self._say_text(msg, await self.admin_commands.reply_to(msg, command))
        elif command == "reset":
            await self.core.reset(conversation)
            await self._say(msg, "reset_done")
        elif command == "cancel":
            await self._cancel(msg, conversation)
        elif command == "export":
            await self._export(msg, conversation)

    async def _cancel(self, msg: Message, conversation: ConversationId) -> None:
        """Cancel the jobs and everything still on its way from before this /cancel."""
        key = conversation.key()
        self._cancel_before[key] = max(self._cancel_before.get(key, 0), msg.message_id)
        on_the_way = any(i < msg.message_id for i in self._in_hand.get(key, ()))
        async with self._chat_lock(msg.chat.id):  # a submit under way finishes first
            cancelled = await self.core.cancel(conversation)
        if cancelled == 0 and not on_the_way:
            await self._say(msg, "nothing_to_cancel")

    async def _dropped_by_cancel(self, messages: list[Message]) -> bool:
        """True (and "Cancelled." said) if a /cancel came after these messages. Chat lock held."""
        barrier = self._cancel_before.get(conversation_of(messages[0]).key(), 0)
        if max(m.message_id for m in messages) >= barrier:
            return False
        await self._say(messages[0], "cancelled")
        return True

    def _unknown_command(self, msg: Message) -> tuple[str, bool] | None:
        """(name, addressed to this bot by @name) if the message starts with a command that is
        neither one of ours nor a preset; None otherwise."""
        entities = msg.parse_entities() if msg.text else msg.parse_caption_entities()
        for entity, value in entities.items():
            if entity.type != MessageEntity.BOT_COMMAND or entity.offset != 0:
                continue
            name, _, target = value.lstrip("/").partition("@")
            if target and target.lower() != self.bot.username.lower():
                return None  # for another bot
            if name.lower() in (*COMMAND_NAMES, *ADMIN_COMMANDS) or get_preset(name) is not None:
                return None
            return name, bool(target) or msg.chat.type == ChatType.PRIVATE
        return None

    async def _say_unknown(self, msg: Message, name: str) -> None:
        commands = ", ".join("/" + c for c in COMMAND_NAMES if c != "start")
        await self._say(msg, "unknown_command", command=name, commands=commands, presets=_presets())

    async def _export(self, msg: Message, conversation: ConversationId) -> None:
        """/export: the chat's stored history as a Markdown and a JSON document."""
        data = await self.core.history.export(conversation)
        if not data["turns"]:
            await self._say(msg, "export_empty")
            return
        files = [("conversation.md", to_markdown(data).encode()),
                 ("conversation.json", json.dumps(data, ensure_ascii=False, indent=2).encode())]
        for name, body in files:
            async with self.ledger.sending(msg.chat.id):
                sent = await self.bot.send_document(msg.chat.id, InputFile(body, filename=name),
                                                    message_thread_id=thread_of(msg))
            await self.ledger.sent(msg.chat.id, sent.message_id)

    async def on_error(self, update: object, context: Context) -> None:
        error = context.error
        log.error("telegram handler failed: %s: %s", type(error).__name__, error,
                  exc_info=error if not isinstance(error, TelegramError) else None)
        # the user still gets a reply (e.g. the file download failed): nothing silently lost
        if not isinstance(update, Update):
            return
        msg = update.effective_message
        if msg is not None and msg.from_user is not None:
            try:
                await self._say(msg, "failed", ref=f"u{update.update_id}")
            except TelegramError as exc:
                log.warning("could not report the failure to the chat: %s", exc)
        await self.queue.settle(update.update_id)

    # --- admission ---------------------------------------------------------------------------

    async def _allowed(self, msg: Message) -> bool:
        """The settings allowlists and the database's entries (/allow, /deny), with admins in."""
        user_id = msg.from_user.id if msg.from_user else 0
        return await self.core.admin.access("telegram", str(user_id), str(msg.chat.id))

    async def _admit(self, msg: Message, quietly: bool = False) -> bool:
        """Allowlist and rate limit; `quietly`: a refusal by the allowlist is only logged (no
        one asked: an auto-triaged image)."""
        if not await self._allowed(msg):
            log.info("telegram: refused user %s in chat %s (not in the allowlist)",
                     msg.from_user.id if msg.from_user else "?", msg.chat.id)
            if not quietly:
                await self._say(msg, "not_allowed")
            return False
        assert msg.from_user is not None
        ok, wait, tell = self.rate.check(msg.from_user.id)
        if not ok and tell:
            await self._say(msg, "rate_limited", retry_s=wait)
        return ok

    def _addressed(self, msg: Message) -> tuple[bool, str]:
        """Whether a message is for the bot, and its text without the /ask command or @mention.
        In private chats everything is; in groups a mention, a reply to the bot, or /ask."""
        text = msg.text or msg.caption or ""
        entities = msg.parse_entities() if msg.text else msg.parse_caption_entities()
        me = self.bot.username.lower()
        hit = False
        cut: list[tuple[int, int]] = []
        for entity, value in entities.items():
            if entity.type == MessageEntity.BOT_COMMAND and entity.offset == 0:
                name, _, target = value.lstrip("/").partition("@")
                if name.lower() == "ask" and (not target or target.lower() == me):
                    hit = True
                    cut.append((entity.offset, entity.length))
            elif (entity.type == MessageEntity.MENTION and value.lower() == "@" + me) or (
                entity.type == MessageEntity.TEXT_MENTION
                and entity.user is not None
                and entity.user.id == self.bot.id
            ):
                hit = True
                cut.append((entity.offset, entity.length))
        question = _remove(text, cut).strip()
        if msg.chat.type == ChatType.PRIVATE:
            return True, question
        reply = msg.reply_to_message
        if reply is not None and reply.from_user is not None and reply.from_user.id == self.bot.id:
            hit = True
        return hit, question

    # --- albums ------------------------------------------------------------------------------

    def _collect_album(self, msg: Message, update_id: int) -> None:
        key = (msg.chat.id, str(msg.media_group_id))
        album = self.albums.setdefault(key, Album())
        if msg.message_id in {m.message_id for m in album.messages}:
            return  # the same part twice (replayed and redelivered)
        album.messages.append(msg)
        album.update_ids.append(update_id)
        self._in_hand.setdefault(conversation_of(msg).key(), set()).add(msg.message_id)
        if album.task is None:
            album.task = asyncio.create_task(self._flush_album(key), name=f"tg-album-{key[1]}")

    async def _flush_album(self, key: tuple[int, str]) -> None:
        await asyncio.sleep(self.album_wait_s)
        async with self._chat_lock(key[0]):
            album = self.albums.pop(key, None)
            if album is None:
                return
            messages = sorted(album.messages, key=lambda m: m.message_id)
            try:
                await self._album_turn(messages, f"telegram:album:{key[0]}:{key[1]}")
            except Exception as exc:
                log.error("telegram album %s failed: %r", key[1], exc)
                with contextlib.suppress(TelegramError):
                    await self._say(messages[0], "failed", ref=f"u{album.update_ids[0]}")
            finally:
                self._release(conversation_of(messages[0]).key(), [m.message_id for m in messages])
        await self.queue.settle(*album.update_ids)

    async def _album_turn(self, messages: list[Message], event_key: str) -> None:
        if await self._dropped_by_cancel(messages) or await self._invalid_text(messages):
            return
        checked = [self._addressed(m) for m in messages]
        addressed = any(hit for hit, _ in checked)
        triage = not addressed and await self.triage.wants(messages)
        if not (addressed or triage) or not await self._admit(messages[0], quietly=triage):
            return
        question = " ".join(q for _, q in checked if q)
        await self._turn(self.triage.screenshots(messages) if triage else messages, question,
                         event_key, triage=triage)

    async def _invalid_text(self, messages: list[Message]) -> bool:
        """True (and said so) if a text or caption is not valid Unicode (a lone surrogate)."""
        for m in messages:
            try:
                (m.text or m.caption or "").encode("utf-8")
            except UnicodeEncodeError:
                await self._say(messages[0], "invalid_text")
                return True
        return False

    # --- a turn ------------------------------------------------------------------------------

    async def _turn(self, messages: list[Message], question: str, event_key: str,
                    triage: bool = False) -> None:
        """`triage`: an image in an auto-triage group (adapters/telegram/auto_triage.py)."""
        first = messages[0]
        assert first.from_user is not None
        lang = first.from_user.language_code
        conversation = self.triage.conversation_of(first) if triage else conversation_of(first)
        try:
            refs: list[FileRef] = [ref for m in messages for ref in image_refs(m)]
            for ref in refs:
                check_size(ref, self.settings.max_image_bytes)
            if len(refs) > self.settings.max_images_per_message:
                raise InputRejected("too_many_images", "album too big", count=len(refs),
                                    limit=self.settings.max_images_per_message)
            images = [await self._download(ref) for ref in refs]
            if not images and first.reply_to_message is not None:
                images = await self._replied_images(first.reply_to_message, conversation)
            if images and not question and not triage:
                question = self.tg.default_prompt
            if not images and not question:
                raise InputRejected("empty_question", "nothing asked")
            incoming = Incoming(
                conversation=conversation,
                user=User(str(first.from_user.id), first.from_user.full_name, lang),
                message=TurnMessage.of(question, *images),
                origin={
                    "chat_id": first.chat.id,
                    "message_id": first.message_id,
                    "message_ids": [m.message_id for m in messages],
                    "thread_id": thread_of(first),
                    "lang": lang,
                    "group": first.chat.type != ChatType.PRIVATE,
                    **(self.triage.origin_of(first) if triage else {}),
                },
                event_key=event_key,
            )
            acceptance = await self.core.submit(incoming)
        except InputRejected as exc:
            await self._say(first, exc.code, **exc.params)
            return
        except QueueFull as exc:
            await self._say(first, "busy", queued=exc.queued, retry_s=math.ceil(exc.retry_after_s))
            return
        if acceptance.duplicate:
            log.info("telegram: %s already handled", event_key)

    async def _download(self, ref: FileRef) -> ImagePart:
        return await download(self.bot, ref, self.settings.max_image_bytes)

    async def _replied_images(self, target: Message, conversation: ConversationId) -> list[ImagePart]:
        """The image a reply is about: the photo replied to, or the one the replied-to question
        or answer was about. [] when that is the conversation's latest image anyway."""
        try:
            refs = image_refs(target)
        except InputRejected:
            refs = []
        if refs:
            images = [await self._download(ref) for ref in refs]
        else:
            images = await images_of_earlier_message(self.core, conversation, target.message_id)
        if images and [i.sha256 for i in images][-1] == await latest_image_sha(self.core, conversation):
            return []
        return images

    async def _say(self, msg: Message, key: str, **params: Any) -> None:
        lang = msg.from_user.language_code if msg.from_user else None
        await self._say_text(msg, texts.text(key, lang, **params))

    async def _say_text(self, msg: Message, text: str) -> None:
        try:
            async with self.ledger.sending(msg.chat.id):
                sent = await self.bot.send_message(
                    msg.chat.id, text,
                    message_thread_id=thread_of(msg),
                    reply_parameters=ReplyParameters(msg.message_id, allow_sending_without_reply=True),
                )
            await self.ledger.sent(msg.chat.id, sent.message_id)
        except TelegramError as exc:
            log.info("telegram: could not reply in chat %s: %s", msg.chat.id, exc.message)


def _presets() -> str:
    return ", ".join("/" + name for name in preset_names())


def thread_of(msg: Message) -> int | None:
    return msg.message_thread_id if msg.is_topic_message and msg.chat.is_forum else None


def conversation_of(msg: Message) -> ConversationId:
    thread = thread_of(msg)
    return ConversationId("telegram", str(msg.chat.id), str(thread) if thread is not None else None)


def _remove(text: str, spans: list[tuple[int, int]]) -> str:
    """Remove entity spans (UTF-16 offsets, as Telegram counts) from text."""
    if not spans:
        return text
    raw = text.encode("utf-16-le")
    for offset, length in sorted(spans, reverse=True):
        raw = raw[: offset * 2] + raw[(offset + length) * 2:]
    return raw.decode("utf-16-le")
