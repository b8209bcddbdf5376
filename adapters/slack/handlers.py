"""Bolt listeners: Slack events and the slash command → `Incoming` → `core.submit`.

The same listener functions serve both transports (Socket Mode and the HTTP Events API): bolt
dispatches either kind of request to them. They only normalise, download the images, submit and
return: the runner answers later through `ReplyWriter`. Events are acknowledged by bolt before the
listener runs; the slash command acknowledges ("working…") before anything slow happens.

Conversations: a channel mention lives in its thread (`thread_ts`, or the mention's own `ts` when
it starts one); a DM is one conversation (no thread); a slash command's conversation is its
channel or DM. A plain message (no mention) in a thread counts as a follow-up when
`follow_all_thread_messages` is on (the default) and the bot has answered in that thread, unless
it is from a bot or addressed to someone else (mentions another user, a group or @here).

Attachments that are not images are not read: the reply says which were skipped and why. A slash
command reads the images it links (Slack file links with the bot token, other https URLs through
the SSRF guard of bot/remote_images.py) instead of the channel's latest image.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.admin_commands import SlackAdminCommands, admin_verb
from adapters.slack.auto_triage import SlackTriage, has_image
from adapters.slack.files import SlackFiles, latest_image_file
from adapters.slack.format import addresses_others, escape, page_message, split_links, strip_mentions
from adapters.slack.replies import ReplyWriter
from bot.adapter import Core, Incoming, QueueFull
from bot.export import to_markdown
from bot.models import ConversationId, ImagePart, InputRejected, Message, User, size_text
from bot.presets import parse_preset_command
from bot.remote_images import RemoteImageError, RemoteImageFetcher
from bot.settings import Settings
from bot.texts import text

log = logging.getLogger("vlbot.slack")

# Message subtypes that are a person saying something; edits, joins, deletions... are not.
TURN_SUBTYPES = (None, "file_share", "thread_broadcast")


def check_text(value: str) -> None:
    """Refuse text that is not valid Unicode (a lone UTF-16 surrogate from an escaped "\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputRejected("invalid_text", "text is not valid Unicode") from None


class SlackHandlers:
    def __init__(
        self, settings: Settings, client: AsyncWebClient, files: SlackFiles, replies: ReplyWriter,
        fetcher: RemoteImageFetcher, triage: SlackTriage,
    ) -> None:
        self.settings = settings
        self.slack = settings.slack
        self.client = client
        self.files = files
        self.replies = replies
        self.fetcher = fetcher
        self.triage = triage
        self.admin_commands = SlackAdminCommands(self.slack.slash_command)  # allow, deny, quota, usage
        self.core: Core | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()  # event ids seen by this process
        self._threads: set[str] = set()  # threads this process replied in

    # --- filters -----------------------------------------------------------------------------

    async def _allowed(self, team: str | None, channel: str | None, user: Any) -> bool:
        """The team allowlist, then the settings allowlists and the database's entries (admins'
        allow/deny of users and channels; a DM is not held to a channel list)."""
        if self.slack.allowed_teams and team not in self.slack.allowed_teams:
            log.info("ignored: team %s is not allowed", team)
            return False
        assert self.core is not None
        if not await self.core.admin.access("slack", str(user or ""), channel):
            log.info("ignored: user %s in channel %s is not allowed", user, channel)
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
        if self._from_a_bot(event, context) or not await self._allowed(
            _team(body, event), channel, event.get("user")
        ):
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
        if not await self._allowed(_team(body, event), channel, event.get("user")):
            return
        if event.get("channel_type") == "im":
            conversation = ConversationId("slack", channel)
            origin = {"channel": channel, "thread_ts": None, "message_ts": event["ts"]}
        else:
            thread = event.get("thread_ts")
            words = str(event.get("text") or "")
            mentioned = bool(context.bot_user_id) and f"<@{context.bot_user_id}" in words
            if not mentioned and await self.triage.covers(channel):  # an auto-triage channel
                await self._auto_triage(body, event, channel)
                return
            if not thread or mentioned or not self.slack.follow_all_thread_messages:
                return  # mentions arrive as app_mention; other channel chatter is not for us
            if addresses_others(words, context.bot_user_id):
                return  # "@bob what do you think?" in the bot's thread is for bob
            conversation = ConversationId("slack", channel, thread)
            if not await self._bot_in_thread(conversation):
                return
            origin = {"channel": channel, "thread_ts": thread, "message_ts": event["ts"]}
        if self._first_time(body.get("event_id")):
            await self._turn(conversation, event, origin, body)

    async def _auto_triage(self, body: dict[str, Any], event: dict[str, Any], channel: str) -> None:
        """An image posted in an auto-triage channel: triaged, answered in its thread. Messages
        without an image are left alone there (see adapters/slack/auto_triage.py)."""
        if not has_image(event.get("files")) or not self._first_time(body.get("event_id")):
            return
        wanted, _ = await self.files.sort_out(event.get("files"))  # looks up files of unknown type
        if not wanted:
            return  # a PDF, a snippet... is not a screenshot: nothing to say
        conversation, origin = self.triage.turn_of(channel, event)
        origin["link"] = await self.triage.link(channel, str(event["ts"]))
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
            question = strip_mentions(event.get("text") or "")
            check_text(question)
            wanted, others = await self.files.sort_out(event.get("files"))
            skipped = ", ".join(others)
            if skipped:  # not read: the reply, answer or refusal, says what was left out and why
                origin = {**origin, "notice": text("slack_skipped_files", origin.get("lang"), names=skipped)}
            images = await self.files.images_of(wanted)
            if skipped and not images and not question:
                raise InputRejected("slack_skipped_files", "only non-image files", names=skipped)
            incoming = Incoming(
                conversation, user, Message.of(question or None, *images), origin,
                event_key=f"slack:event:{event_id}" if event_id else None,
            )
            acceptance = await self.core.submit(incoming)
        except InputRejected as exc:
            reason, notice = text(exc.code, origin.get("lang"), **exc.params), origin.get("notice")
            await self._tell(origin, reason if notice in (None, reason) else f"{notice}\n{reason}")
            return
        except QueueFull as exc:
            busy = text("busy", origin.get("lang"), queued=exc.queued, retry_s=round(exc.retry_after_s))
            await self._tell(origin, busy)
            return
        except Exception as exc:  # never silence
            await self._failed(origin, str(event_id or event.get("ts")), exc)
            return
        self._threads.add(conversation.key())
        log.info("slack event %s → job %s (duplicate=%s)", event_id, acceptance.job_id, acceptance.duplicate)

    async def _failed(self, origin: dict[str, Any], ref: str, exc: Exception) -> None:
        """An unexpected error before the job was queued: the user is told, with a reference; the
        log names the error's type (the traceback, which may quote user text, only at DEBUG)."""
        log.error("slack request %s could not be submitted: %s", ref, type(exc).__name__)
        log.debug("slack request %s", ref, exc_info=True)
        await self._tell(origin, text("failed", origin.get("lang"), ref=ref))

    async def _tell(self, origin: dict[str, Any], message: str) -> None:
        """A direct reply outside the job flow (input rejected, queue full, no image...)."""
        if origin.get("thread_ts") and not origin.get("ephemeral"):  # a thread the bot talks in
            self._threads.add(ConversationId("slack", str(origin["channel"]), origin["thread_ts"]).key())
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
        given = (command.get("text") or "").strip()
        channel = str(command.get("channel_id"))
        word = given.lower()
        if not await self._allowed(command.get("team_id"), channel, command.get("user_id")):
            await ack(response_type="ephemeral", text=text("not_allowed"))
            return
        if word in ("", "help"):
            follow_ups = text("slack_follow_ups_all" if self.slack.follow_all_thread_messages
                              else "slack_follow_ups_mention")
            await ack(response_type="ephemeral", text=escape(text(
                "slack_help", command=self.slack.slash_command, model=self.core.status().model,
                limit=size_text(self.settings.max_image_bytes), follow_ups=follow_ups,
            ) + self.admin_commands.help_lines(self.core, str(command.get("user_id")))))
            return
        verb = admin_verb(given)  # "/vlbot allow @someone", "/vlbot usage 7"...
        if verb is not None:
            reply = await self.admin_commands.reply_to(self.core, command, verb)
            await ack(response_type="ephemeral", text=reply)
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
        question, links = split_links(given)  # "/vlbot what is this? https://…/chart.png"
        preset, rest = parse_preset_command(question, bare=True)  # "/vlbot triage what broke?"
        if preset is not None:
            question = f"/{preset.name} {rest}".strip()
        await ack(response_type="ephemeral", text=text("slack_working"))
        origin: dict[str, Any] = {
            "channel": channel, "thread_ts": None, "user": command.get("user_id"),
            "response_url": command.get("response_url"), "ephemeral": not self.slack.answer_in_channel,
        }
        try:
            check_text(question)
            images = await (self._linked_images(conversation, links) if links
                            else self._latest_image(conversation))
        except InputRejected as exc:
            await self._tell(origin, text(exc.code, None, **exc.params))
            return
        except Exception as exc:  # never silence after "working…"
            await self._failed(origin, str(command.get("trigger_id")), exc)
            return
        if images is None:
            await self._tell(origin, text("slack_attach_hint", command=self.slack.slash_command))
            return
        user = User(platform_id=str(command.get("user_id", "")), display_name=command.get("user_name", ""))
        trigger = command.get("trigger_id")
        incoming = Incoming(
            conversation, user, Message.of(question or None, *images), origin,
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
            raise InputRejected("slack_download_failed", error, name="that file", status=error) from exc
        known = await self._known_images(conversation)
        if found is None:
            return () if known else None
        image = await self.files.download(found)
        return () if image.sha256 in known else (image,)

    async def _linked_images(self, conversation: ConversationId, links: list[str]) -> tuple[ImagePart, ...]:
        """The images a slash command links: Slack file links are downloaded with the bot token,
        other https URLs fetched through the SSRF guard. Images the conversation already holds
        are not sent again."""
        if len(links) > self.files.max_images:
            raise InputRejected("too_many_images", f"{len(links)} links", count=len(links),
                                limit=self.files.max_images)
        images: list[ImagePart] = []
        for url in links:
            stub = self.files.file_link(url)
            if stub is not None:
                images.append(await self.files.download(stub))
                continue
            if urlsplit(url).scheme.lower() != "https":
                raise InputRejected("slack_link_not_https", "not an https link", url=url)
            try:
                images.append(await self.fetcher.fetch(url))
            except RemoteImageError as exc:
                log.info("image link refused or failed: %s", type(exc).__name__)
                raise InputRejected("slack_link_failed", "image link", url=url, reason=str(exc)) from exc
        known = await self._known_images(conversation)
        return tuple(image for image in images if image.sha256 not in known)

    async def _known_images(self, conversation: ConversationId) -> set[str]:
        assert self.core is not None
        history = await self.core.history.recent(conversation)
        return {image.sha256 for turn in history for image in turn.images}


MAX_EPHEMERAL = 39_000  # Slack's message text limit is 40k


def _team(body: dict[str, Any], event: dict[str, Any]) -> str | None:
    team = body.get("team_id") or event.get("team")
    return str(team) if team else None
