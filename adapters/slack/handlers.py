"""Bolt listeners: Slack events and the slash command → `Incoming` → `core.submit`.

The same listener functions serve both transports (Socket Mode and the HTTP Events API): bolt
dispatches either kind of request to them. They only normalise, download the images, submit and
return: the runner answers later through `ReplyWriter`. Events are acknowledged by bolt before the
listener runs; the slash command acknowledges ("working…") before anything slow happens.

Conversations: a channel mention lives in its thread (`thread_ts`, or the mention's own `ts` when
it starts one); a DM is one conversation (no thread); a slash command's conversation is its
channel or DM.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.files import SlackFiles, latest_image_file
from adapters.slack.format import escape, page_message, strip_mentions
from adapters.slack.replies import ReplyWriter
from bot.adapter import Core, Incoming, QueueFull
from bot.export import to_markdown
from bot.models import ConversationId, ImagePart, InputRejected, Message, User
from bot.presets import parse_preset_command
from bot.settings import Settings
from bot.texts import text

log = logging.getLogger("vlbot.slack")

# Message subtypes that are a person saying something; edits, joins, deletions... are not.
TURN_SUBTYPES = (None, "file_share", "thread_broadcast")


class SlackHandlers:
    def __init__(
        self, settings: Settings, client: AsyncWebClient, files: SlackFiles, replies: ReplyWriter
    ) -> None:
        self.settings = settings
        self.slack = settings.slack
        self.client = client
        self.files = files
        self.replies = replies
        self.core: Core | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()  # event ids seen by this process
        self._threads: set[str] = set()  # threads this process answered in

    # --- filters -----------------------------------------------------------------------------

    def _allowed(self, team: str | None, channel: str | None) -> bool:
        if self.slack.allowed_teams and team not in self.slack.allowed_teams:
            log.info("ignored: team %s is not allowed", team)
            return False
        is_dm = (channel or "").startswith("D")
        if self.slack.allowed_channels and not is_dm and channel not in self.slack.allowed_channels:
            log.info("ignored: channel %s is not allowed", channel)
            return False
        return True

    @staticmethod
    def _from_a_bot(event: dict[str, Any], context: AsyncBoltContext) -> bool:
        return bool(
            event.get("bot_id")
            or event.get("bot_profile")
            or event.get("subtype") == "bot_message"
            or (context.bot_user_id and event.get("user") == context.bot_user_id)
            or not event.get("user")
        )

    def _first_time(self, event_id: str | None) -> bool:
        """In-process dedupe of Slack retries (before any download); the runner's persisted
        event_key covers restarts."""
        if not event_id:
            return True
        if event_id in self._seen:
            log.info("event %s already handled (Slack retry)", event_id)
            return False
        self._seen[event_id] = None
        while len(self._seen) > 10_000:
            self._seen.popitem(last=False)
        return True

    # --- events ------------------------------------------------------------------------------

    async def on_mention(
        self, body: dict[str, Any], event: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        channel = event.get("channel")
        if self._from_a_bot(event, context) or not self._allowed(_team(body, event), channel):
            return
        if not self._first_time(body.get("event_id")):
            return
        thread = event.get("thread_ts") or event["ts"]
        origin = {"channel": channel, "thread_ts": thread, "message_ts": event["ts"]}
        await self._turn(ConversationId("slack", str(channel), thread), event, origin, body)

    async def on_message(
        self, body: dict[str, Any], event: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        if event.get("subtype") not in TURN_SUBTYPES or self._from_a_bot(event, context):
            return
        channel = str(event.get("channel"))
        if not self._allowed(_team(body, event), channel):
            return
        if event.get("channel_type") == "im":
            conversation = ConversationId("slack", channel)
            origin = {"channel": channel, "thread_ts": None, "message_ts": event["ts"]}
        else:
            thread = event.get("thread_ts")
            mentioned = bool(context.bot_user_id) and f"<@{context.bot_user_id}" in event.get("text", "")
            if not thread or mentioned or not self.slack.follow_all_thread_messages:
                return  # mentions arrive as app_mention; other channel chatter is not for us
            conversation = ConversationId("slack", channel, thread)
            if not await self._bot_in_thread(conversation):
                return
            origin = {"channel": channel, "thread_ts": thread, "message_ts": event["ts"]}
        if self._first_time(body.get("event_id")):
            await self._turn(conversation, event, origin, body)

    async def _bot_in_thread(self, conversation: ConversationId) -> bool:
        if conversation.key() in self._threads:
            return True
        assert self.core is not None
        return bool(await self.core.history.recent(conversation, limit=1))

    async def _turn(
        self, conversation: ConversationId, event: dict[str, Any], origin: dict[str, Any],
        body: dict[str, Any],
    ) -> None:
        assert self.core is not None
        event_id = body.get("event_id")
        user = User(platform_id=str(event.get("user", "")))
        try:
            images = await self.files.images_of(event.get("files"))
            question = strip_mentions(event.get("text") or "")
            if event.get("files") and not images and not question:
                raise InputRejected("send_an_image", "only non-image files")
            incoming = Incoming(
                conversation, user, Message.of(question or None, *images), origin,
                event_key=f"slack:event:{event_id}" if event_id else None,
            )
            acceptance = await self.core.submit(incoming)
        except InputRejected as exc:
            await self._tell(origin, text(exc.code, origin.get("lang"), **exc.params))
            return
        except QueueFull as exc:
            busy = text("busy", origin.get("lang"), queued=exc.queued, retry_s=round(exc.retry_after_s))
            await self._tell(origin, busy)
            return
        self._threads.add(conversation.key())
        log.info("slack event %s → job %s (duplicate=%s)", event_id, acceptance.job_id, acceptance.duplicate)

    async def _tell(self, origin: dict[str, Any], message: str) -> None:
        """A direct reply outside the job flow (input rejected, queue full, no image...)."""
        try:
            if origin.get("response_url") or origin.get("ephemeral"):
                await self.replies.post_ephemeral(origin, page_message([escape(message)]))
            else:
                await self.client.chat_postMessage(
                    channel=origin["channel"], thread_ts=origin.get("thread_ts"), text=escape(message)
                )
        except SlackApiError as exc:
            log.warning("could not reply in %s: %s", origin.get("channel"), exc.response.get("error"))

    # --- the slash command -------------------------------------------------------------------

    async def on_command(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        assert self.core is not None
        question = (command.get("text") or "").strip()
        channel = str(command.get("channel_id"))
        word = question.lower()
        if not self._allowed(command.get("team_id"), channel):
            await ack(response_type="ephemeral", text=text("not_allowed"))
            return
        if word in ("", "help"):
            limit_mb = f"{self.settings.max_image_mb:g}"
            await ack(response_type="ephemeral", text=escape(text(
                "slack_help", command=self.slack.slash_command, model=self.core.status().model,
                limit_mb=limit_mb,
            )))
            return
        conversation = ConversationId("slack", channel)
        if word == "reset":
            await self.core.reset(conversation)
            await ack(response_type="ephemeral", text=text("reset_done"))
            return
        if word == "export":  # the channel's stored conversation, as Markdown, to the caller
            exported = await self.core.history.export(conversation)
            body = to_markdown(exported) if exported["turns"] else text("export_empty")
            await ack(response_type="ephemeral", text=escape(body)[:MAX_EPHEMERAL])
            return
        preset, rest = parse_preset_command(question, bare=True)  # "/vlbot triage what broke?"
        if preset is not None:
            question = f"/{preset.name} {rest}".strip()
        await ack(response_type="ephemeral", text=text("slack_working"))
        origin: dict[str, Any] = {
            "channel": channel, "thread_ts": None, "user": command.get("user_id"),
            "response_url": command.get("response_url"), "ephemeral": not self.slack.answer_in_channel,
        }
        try:
            images = await self._latest_image(conversation)
        except InputRejected as exc:
            await self._tell(origin, text(exc.code, None, **exc.params))
            return
        if images is None:
            await self._tell(origin, text("slack_attach_hint", command=self.slack.slash_command))
            return
        user = User(platform_id=str(command.get("user_id", "")), display_name=command.get("user_name", ""))
        trigger = command.get("trigger_id")
        incoming = Incoming(
            conversation, user, Message.of(question, *images), origin,
            event_key=f"slack:command:{trigger}" if trigger else None,
        )
        try:
            await self.core.submit(incoming)
        except InputRejected as exc:
            await self._tell(origin, text(exc.code, None, **exc.params))
        except QueueFull as exc:
            await self._tell(origin, text("busy", queued=exc.queued, retry_s=round(exc.retry_after_s)))

    async def _latest_image(self, conversation: ConversationId) -> tuple[ImagePart, ...] | None:
        """The channel's latest image for this turn: () when the conversation's history already
        holds it, None when there is no image anywhere."""
        assert self.core is not None
        try:
            found = await latest_image_file(self.client, conversation.chat)
        except SlackApiError as exc:
            error = str(exc.response.get("error", ""))
            log.warning("conversations.history in %s: %s", conversation.chat, error)
            if error in ("not_in_channel", "channel_not_found"):
                raise InputRejected("slack_not_in_channel", error) from exc
            raise InputRejected("slack_download_failed", error, status=error) from exc
        history = await self.core.history.recent(conversation)
        known = {image.sha256 for turn in history for image in turn.images}
        if found is None:
            return () if known else None
        image = await self.files.download(found)
        return () if image.sha256 in known else (image,)


MAX_EPHEMERAL = 39_000  # Slack's message text limit is 40k


def _team(body: dict[str, Any], event: dict[str, Any]) -> str | None:
    team = body.get("team_id") or event.get("team")
    return str(team) if team else None
