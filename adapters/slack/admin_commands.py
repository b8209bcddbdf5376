"""Slack's admin subcommands of the slash command: `/vlbot allow|deny|quota …` (admins) and
`/vlbot usage [who] [days]` (everyone), including the channel allowlist (`/vlbot allow #channel`),
and `/vlbot autotriage [#channel|here] [on|off]` (admins: auto-triage of a channel's images).

Whom a command is about: a mention as Slack escapes it in a slash command's text (`<@U…|name>`,
`<#C…|name>`; the app's manifest sets should_escape), a bare user or channel id (U…, C…), or
`here` (this channel). A plain "@name" (escaping off) cannot be resolved to an id: the reply says
how to fix that. The commands run through bot/admin_chat.py; the reply is ephemeral.
"""

from __future__ import annotations

import re
from typing import Any

from adapters.slack.format import escape
from bot import texts
from bot.adapter import Core
from bot.admin_args import ADMIN_VERBS, AdminArgError, AdminVerb
from bot.admin_chat import Asker, ChatAdmin
from bot.admin_types import Subject

PLATFORM = "slack"
_USER_RE = re.compile(r"<@([UW][A-Z0-9]{2,})(?:\|[^>]*)?>|([UW][A-Z0-9]{2,})")
_CHANNEL_RE = re.compile(r"<#([CGD][A-Z0-9]{2,})(?:\|[^>]*)?>|([CGD][A-Z0-9]{2,})")
# a word of the command's text: an escaped <…> token (its label may hold spaces), or a word
_WORD_RE = re.compile(r"<[^>]*>|\S+")
VERBS: dict[str, AdminVerb] = {verb: verb for verb in ADMIN_VERBS}


class SlackNames:
    """bot.admin_chat.ChatPlatform for Slack: mentions and ids."""

    name = PLATFORM

    def target(self, word: str) -> Subject:
        user = _USER_RE.fullmatch(word)
        if user is not None:
            return Subject(PLATFORM, "user", user.group(1) or user.group(2))
        channel = _CHANNEL_RE.fullmatch(word)
        if channel is not None:
            return Subject(PLATFORM, "chat", channel.group(1) or channel.group(2))
        if word.startswith(("@", "#")):
            raise AdminArgError("admin_slack_plain_mention", arg=word)
        raise AdminArgError("admin_bad_target", arg=word)

    def label(self, subject: Subject, lang: str | None) -> str:
        return f"<@{subject.id}>" if subject.kind == "user" else f"<#{subject.id}>"

    def quote(self, text: str) -> str:
        return escape(text)

    def is_group(self, chat: Subject) -> bool:
        return chat.kind == "chat" and not chat.id.startswith("D")  # D…: a direct message


def admin_verb(given: str) -> AdminVerb | None:
    """The admin subcommand the slash command's text starts with, if any."""
    first = given.split(maxsplit=1)[0].lower() if given.strip() else ""
    return VERBS.get(first)


class SlackAdminCommands:
    def __init__(self, slash_command: str) -> None:
        self.slash_command = slash_command
        self.chat_admin = ChatAdmin(SlackNames(), command_prefix=slash_command + " ")

    def help_lines(self, core: Core, user_id: str) -> str:
        """What the help adds: `usage` for everyone, the admin subcommands for an admin."""
        lines = "\n" + texts.text("admin_slack_usage_help", command=self.slash_command)
        if core.admin.is_admin(PLATFORM, user_id):
            lines += "\n" + texts.text("admin_slack_help", command=self.slash_command)
        return lines

    async def reply_to(self, core: Core, command: dict[str, Any], verb: AdminVerb) -> str:
        """Run the subcommand of a slash command; the (mrkdwn) text to answer with."""
        words = _WORD_RE.findall(str(command.get("text") or ""))[1:]
        asker = Asker(
            user=Subject(PLATFORM, "user", str(command.get("user_id", ""))),
            chat=Subject(PLATFORM, "chat", str(command.get("channel_id", ""))),
            lang=None,  # Slack does not send the user's language with a command
        )
        return await self.chat_admin.run(core.admin, verb, words, asker)
