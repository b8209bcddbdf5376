"""Auto-triage channels, and posts of the triage workflow into other channels.

In a channel named in `settings.triage.slack_channels` or turned on by an admin (`/vlbot
autotriage #channel on`; bot/triage/places.py, looked up for each message), every message with
an image (no mention needed) is triaged with the `triage` preset: the job's origin carries preset="triage",
auto_triage=True and `link`, the message's permalink, and the answer goes into the image's
thread. A mention there is an ordinary question (app_mention); messages without an image,
thread replies included, are left alone (people discuss the problem in the thread).

`post` is the triage workflow's way out (routing to an on-call channel, the daily digest): plain
text into any channel the bot may write in, answered with the new message's permalink.

Links come from chat.getPermalink (no scope needed); if that call fails, from the documented
archive form https://<workspace>.slack.com/archives/<channel>/p<ts without the dot>, built from
the workspace URL auth.test reported.
"""

from __future__ import annotations

import logging
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.files import is_other_file
from adapters.slack.format import page_message, pages
from bot.models import ConversationId
from bot.triage.places import AutoTriagePlaces
from bot.triage.rules import Place
from bot.triage.workflow import TRIAGE_PRESET

log = logging.getLogger("vlbot.slack.triage")


# What to do when Slack refuses a post (chat.postMessage's error codes).
POST_HINTS = {
    "not_in_channel": "invite the bot there (/invite @vlbot), or give the app the "
                      "chat:write.public scope for public channels",
    "channel_not_found": "use the channel's ID (C0…, in its details), not its #name, and "
                         "invite the bot if it is private",
    "is_archived": "the channel is archived",
}


class PostRefused(Exception):
    """Slack refused a post of the triage workflow; the message says what to do about it."""

    def __init__(self, channel: str, error: str) -> None:
        hint = POST_HINTS.get(error, "see https://api.slack.com/methods/chat.postMessage")
        super().__init__(f"Slack refused a post into {channel} ({error}): {hint}")
        self.error = error


def has_image(files: list[dict[str, Any]] | None) -> bool:
    """Does a message carry a file that is, or may be, an image (a stub of unknown type is
    looked up later)? Known non-images (a PDF, a snippet) do not count."""
    return any(not is_other_file(f) for f in files or [])


class SlackTriage:
    def __init__(self, client: AsyncWebClient) -> None:
        self.client = client
        self.places: AutoTriagePlaces | None = None  # the core's (core.admin.auto_triage), at start
        self.workspace_url: str | None = None  # https://team.slack.com/, from auth.test at start

    async def covers(self, channel: str) -> bool:
        """An auto-triage channel: named in settings, or turned on by an admin."""
        return self.places is not None and await self.places.covers(Place("slack", channel))

    def turn_of(self, channel: str, event: dict[str, Any]) -> tuple[ConversationId, dict[str, Any]]:
        """The conversation (the image's thread) and reply context of an image to triage."""
        thread = str(event.get("thread_ts") or event["ts"])
        origin = {"channel": channel, "thread_ts": thread, "message_ts": event["ts"],
                  "preset": TRIAGE_PRESET, "auto_triage": True}
        return ConversationId("slack", channel, thread), origin

    async def link(self, channel: str, ts: str) -> str | None:
        """The message's permalink (None only if Slack refuses and the workspace is unknown)."""
        try:
            resp = await self.client.chat_getPermalink(channel=channel, message_ts=ts)
            permalink = resp.get("permalink")
            if isinstance(permalink, str) and permalink:
                return permalink
        except SlackApiError as exc:
            log.info("chat.getPermalink in %s: %s", channel, exc.response.get("error"))
        if self.workspace_url is None:
            return None
        return f"{self.workspace_url.rstrip('/')}/archives/{channel}/p{ts.replace('.', '')}"

    async def post(self, channel: str, text: str) -> str | None:
        """Post plain text (escaped for mrkdwn; bare URLs stay links), one message per page, and
        return the first message's permalink. Raises PostRefused (saying what to do) if Slack
        refuses the post."""
        first: str | None = None
        for page in pages(text):
            try:
                resp = await self.client.chat_postMessage(channel=channel, **page_message(page))
            except SlackApiError as exc:
                raise PostRefused(channel, str(exc.response.get("error"))) from None
            first = first or str(resp["ts"])
        assert first is not None  # pages() has at least one page
        return await self.link(channel, first)
