"""Telegram's admin commands: /allow, /deny, /quota, /autotriage (admins) and /usage (everyone).

Whom a command is about: the author of the message it replies to, or an id argument: a user id
(a positive number), a group's chat id (negative: -100…), or `here` (this chat); /autotriage
[chat id] [on|off] is about the group it is sent in, or the one named. The commands
run through bot/admin_chat.py (checks, changes through core.admin, replies in the asker's
language); this module only reads Telegram's message and registers the command menus: /usage
for everyone, and for each admin, in their private chat with the bot, the admin commands too
(setMyCommands with a chat scope).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

from telegram import Bot, BotCommand, BotCommandScopeChat, Message
from telegram.error import TelegramError

from bot import texts
from bot.adapter import Core
from bot.admin_args import AdminArgError, AdminVerb
from bot.admin_chat import Asker, ChatAdmin
from bot.admin_types import Subject

log = logging.getLogger("vlbot.telegram")

PLATFORM = "telegram"
USAGE_COMMAND: AdminVerb = "usage"  # everyone's
ADMIN_COMMANDS: tuple[AdminVerb, ...] = ("allow", "deny", "quota", "autotriage")  # admins'
MENU = {  # what the bot menu says about them, per language
    "en": {
        "usage": "Your use today and what is left of your limits",
        "allow": "Admin: let a user or chat use the bot",
        "deny": "Admin: stop a user or chat using the bot",
        "quota": "Admin: set a user's or chat's limits",
        "autotriage": "Admin: triage every image in a group (on/off)",
    },
    "zh": {
        "usage": "你今天的用量和剩余额度",
        "allow": "管理员：允许用户或对话使用本机器人",
        "deny": "管理员：禁止用户或对话使用本机器人",
        "quota": "管理员：设置用户或对话的限制",
        "autotriage": "管理员：自动分诊群组中的每张图片（on/off）",
    },
}
_ID_RE = re.compile(r"-?\d{1,20}")


class TelegramNames:
    """bot.admin_chat.ChatPlatform for Telegram: numeric ids."""

    name = PLATFORM

    def __init__(self, bot_id: int) -> None:
        self.bot_id = bot_id

    def target(self, word: str) -> Subject:
        if not _ID_RE.fullmatch(word):
            raise AdminArgError("admin_bad_target", arg=word)
        number = int(word)
        if number == self.bot_id:
            raise AdminArgError("admin_not_me")
        if number == 0:
            raise AdminArgError("admin_bad_target", arg=word)
        return Subject(PLATFORM, "chat" if number < 0 else "user", str(number))

    def label(self, subject: Subject, lang: str | None) -> str:
        return texts.text(f"admin_label_telegram_{subject.kind}", lang, id=subject.id)

    def quote(self, text: str) -> str:
        return text  # replies are plain text

    def is_group(self, chat: Subject) -> bool:
        return chat.kind == "chat" and chat.id.startswith("-")  # private chats: the user's id


VERBS: dict[str, AdminVerb] = {verb: verb for verb in (*ADMIN_COMMANDS, USAGE_COMMAND)}


def is_admin_command(name: str) -> bool:
    return name in VERBS


class TelegramAdminCommands:
    def __init__(self, core: Core, bot_id: int) -> None:
        self.core = core
        self.bot_id = bot_id
        self.chat_admin = ChatAdmin(TelegramNames(bot_id), command_prefix="/")

    def is_admin(self, msg: Message) -> bool:
        return msg.from_user is not None and self.core.admin.is_admin(PLATFORM, str(msg.from_user.id))

    def help_lines(self, msg: Message) -> str:
        """What /help adds: /usage for everyone, the admin commands for an admin."""
        lang = msg.from_user.language_code if msg.from_user else None
        lines = "\n" + texts.text("admin_usage_help", lang)
        return lines + "\n" + texts.text("admin_help", lang) if self.is_admin(msg) else lines

    async def reply_to(self, msg: Message, name: str) -> str:
        """Run /allow, /deny, /quota, /autotriage or /usage from `msg`; the text to answer with."""
        assert msg.from_user is not None and msg.text is not None and is_admin_command(name)
        verb = VERBS[name]
        asker = Asker(
            user=Subject(PLATFORM, "user", str(msg.from_user.id)),
            chat=Subject(PLATFORM, "chat", str(msg.chat.id)),
            lang=msg.from_user.language_code,
            replied_to=self._replied_author(msg),
        )
        words = msg.text.split()[1:]
        reply = await self.chat_admin.run(self.core.admin, verb, words, asker)
        if verb == "autotriage" and self._turns_a_group_on(msg, words) \
                and not msg.get_bot().can_read_all_group_messages:
            reply += "\n" + texts.text("admin_autotriage_privacy", asker.lang)  # see auto_triage.py
        return reply

    def _turns_a_group_on(self, msg: Message, words: list[str]) -> bool:
        """An admin's `/autotriage on` in a group, or `/autotriage -100… on` anywhere."""
        if not self.is_admin(msg) or not words or words[-1].lower() != "on":
            return False
        return msg.chat.id < 0 if len(words) == 1 else len(words) == 2 and words[0].startswith("-")

    def _replied_author(self, msg: Message) -> Subject | None:
        """The author of the message replied to; None when there is none, it is the bot, or the
        "reply" is a forum topic's own start (every message in a topic carries that one)."""
        reply = msg.reply_to_message
        if reply is None or reply.forum_topic_created is not None or reply.from_user is None:
            return None
        if reply.from_user.id == self.bot_id:
            return None
        return Subject(PLATFORM, "user", str(reply.from_user.id))


def with_usage(commands: Sequence[tuple[str, str]], lang: str) -> list[tuple[str, str]]:
    """A language's menu with /usage added before /start."""
    listed = [c for c in commands if c[0] != "start"]
    return [*listed, (USAGE_COMMAND, MENU[lang][USAGE_COMMAND]),
            *(c for c in commands if c[0] == "start")]


async def register_admin_menus(
    bot: Bot, admins: Iterable[str], menus: dict[str, list[tuple[str, str]]]
) -> None:
    """Each admin's private chat with the bot gets the menu plus the admin commands, per
    language (setMyCommands with a chat scope; other chats keep the default menu)."""
    for admin in admins:
        if not _ID_RE.fullmatch(admin) or int(admin) <= 0:
            continue
        for lang, items in menus.items():
            listed = [*items, *((verb, MENU[lang][verb]) for verb in ADMIN_COMMANDS)]
            try:
                await bot.set_my_commands(
                    [BotCommand(name, about) for name, about in listed],
                    scope=BotCommandScopeChat(int(admin)),
                    language_code=None if lang == "en" else lang,
                )
            except TelegramError as exc:  # e.g. the admin never started a chat with the bot
                log.info("telegram: no admin menu for %s: %s", admin, exc.message)
                break
