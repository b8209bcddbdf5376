"""SlackAdapter: a bolt AsyncApp served over Socket Mode or the HTTP Events API.

Transport is chosen by `settings.slack.mode`:
- "socket": an AsyncSocketModeHandler with the app-level token (xapp-...); no public URL.
- "http": an aiohttp server on `listen:port` passing POST /slack/events (events, the slash
  command, url_verification) to bolt, which verifies the v0 signature and the timestamp (older
  than 5 minutes → 401) with the signing secret. A body bolt cannot parse (not UTF-8, JSON nested
  past Python's recursion limit) is refused with 400 before it gets there.
The Web API client talks to `settings.slack.base_url` when set (tests, proxies) and retries
HTTP 429 (honouring Retry-After) and connection errors. `fetcher` fetches the https image links
of a slash command through the SSRF guard (bot/remote_images.py).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.auto_triage import SlackTriage
from adapters.slack.files import SlackFiles
from adapters.slack.handlers import SlackHandlers
from adapters.slack.replies import ReplyWriter
from bot.adapter import Core, ReplyEvent
from bot.models import Job
from bot.remote_images import RemoteImageFetcher
from bot.settings import Settings

log = logging.getLogger("vlbot.slack")

EVENTS_PATH = "/slack/events"
DEFAULT_BASE_URL = "https://slack.com/api/"


class SlackAdapter:
    platform = "slack"

    def __init__(
        self, settings: Settings, *, update_interval_s: float = 1.0, rate_limit_retries: int = 3,
        fetcher: RemoteImageFetcher | None = None,
    ) -> None:
        slack = settings.slack
        if slack.bot_token is None:
            raise ValueError("Slack needs a bot token (xoxb-...): set VLBOT_SLACK__BOT_TOKEN")
        if slack.mode == "http" and slack.signing_secret is None:
            raise ValueError("Slack HTTP mode needs the signing secret: set VLBOT_SLACK__SIGNING_SECRET")
        if slack.mode == "socket" and slack.app_token is None:
            raise ValueError(
                "Slack Socket Mode needs an app-level token (xapp-...): set VLBOT_SLACK__APP_TOKEN"
            )
        self.settings = settings
        self.slack = slack
        base_url = slack.base_url or DEFAULT_BASE_URL
        if not base_url.endswith("/"):
            base_url += "/"
        self.client = AsyncWebClient(
            token=slack.bot_token.get_secret_value(),
            base_url=base_url,
            logger=logging.getLogger("vlbot.slack.web"),
            retry_handlers=[
                AsyncConnectionErrorRetryHandler(max_retry_count=2),
                AsyncRateLimitErrorRetryHandler(max_retry_count=rate_limit_retries),
            ],
        )
        self.app = AsyncApp(
            client=self.client,
            signing_secret=slack.signing_secret.get_secret_value() if slack.signing_secret else "",
            request_verification_enabled=slack.mode == "http",
            process_before_response=False,
            logger=logging.getLogger("vlbot.slack.bolt"),
        )
        self.replies = ReplyWriter(self.client, update_interval_s=update_interval_s)
        self.files = SlackFiles(
            self.client, slack.bot_token.get_secret_value(), settings.max_image_bytes,
            settings.max_images_per_message, own_base_url=slack.base_url,
        )
        self.triage = SlackTriage(self.client)
        self.handlers = SlackHandlers(
            settings, self.client, self.files, self.replies,
            fetcher or RemoteImageFetcher(settings.max_image_bytes), self.triage,
        )
        self.app.event("app_mention")(self.handlers.on_mention)
        self.app.event("message")(self.handlers.on_message)
        self.app.command(slack.slash_command)(self.handlers.on_command)
        self.socket_mode: AsyncSocketModeHandler | None = None
        self._http: web.AppRunner | None = None
        self.http_port: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, core: Core) -> None:
        self.handlers.core = core
        try:
            me = await self.client.auth_test()
        except SlackApiError as exc:
            raise RuntimeError(
                f"Slack rejected the bot token ({exc.response.get('error')}): check "
                "VLBOT_SLACK__BOT_TOKEN (the xoxb-... Bot User OAuth Token of the installed app)"
            ) from exc
        log.info("slack: signed in as %s in team %s", me.get("user_id"), me.get("team_id"))
        self.triage.workspace_url = me.get("url")
        self.triage.places = core.admin.auto_triage  # settings' and admins' auto-triage channels
        if self.slack.mode == "http":
            await self._start_http()
            return
        assert self.slack.app_token is not None
        self.socket_mode = AsyncSocketModeHandler(self.app, self.slack.app_token.get_secret_value())
        try:  # slack_sdk's connect() retries forever on a refused token: check it once first
            self.socket_mode.client.wss_uri = await self.socket_mode.client.issue_new_wss_url()
        except SlackApiError as exc:
            await self.socket_mode.close_async()  # type: ignore[no-untyped-call]
            self.socket_mode = None
            raise RuntimeError(
                f"Slack refused Socket Mode ({exc.response.get('error')}): check VLBOT_SLACK__APP_TOKEN "
                "(an xapp-... app-level token with the connections:write scope) and that Socket Mode "
                "is enabled for the app"
            ) from exc
        await self.socket_mode.connect_async()  # type: ignore[no-untyped-call]
        log.info("slack: connected over Socket Mode")

    async def _start_http(self) -> None:
        server = web.Application()
        server.router.add_post(EVENTS_PATH, self._http_request)
        server.router.add_get("/healthz", self._healthz)
        self._http = web.AppRunner(server, access_log=None)
        await self._http.setup()
        site = web.TCPSite(self._http, self.slack.listen, self.slack.port)
        await site.start()
        address = self._http.addresses[0]
        self.http_port = int(address[1])
        log.info(
            "slack: Events API listening on http://%s:%d%s", self.slack.listen, self.http_port, EVENTS_PATH
        )

    async def _http_request(self, request: web.Request) -> web.Response:
        try:  # bolt parses the body before it checks the signature: refuse what cannot be parsed
            bolt_request = await to_bolt_request(request)
        except (UnicodeDecodeError, RecursionError, ValueError, TypeError, AttributeError) as exc:
            log.info("slack: refused a request body that is not readable (%s)", type(exc).__name__)
            return web.json_response({"ok": False, "error": "invalid_request_body"}, status=400)
        bolt_response = await self.app.async_dispatch(bolt_request)
        return await to_aiohttp_response(bolt_response)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stop(self) -> None:
        if self.socket_mode is not None:
            await self.socket_mode.close_async()  # type: ignore[no-untyped-call]
            self.socket_mode = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        await self.replies.close()
        await self.files.close()

    # --- replies -----------------------------------------------------------------------------

    async def send(self, job: Job, event: ReplyEvent) -> dict[str, Any] | None:
        return await self.replies.send(job, event)

    async def post(self, chat: str, text: str) -> str | None:
        """bot.adapter.Poster: plain text into channel `chat`; the new message's permalink."""
        return await self.triage.post(chat, text)
