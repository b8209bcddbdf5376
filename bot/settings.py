"""One typed settings object (environment prefix VLBOT_, nested adapters with `__`).

Every field here is listed, with a comment, in `.env.example`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.triage.rules import RoutingRule, parse_rules


def default_concurrency() -> int:
    """Jobs in flight at once: the engine decodes concurrent jobs together in one batch (about
    the cost of one), so a few run together even on 2 cores: one per core, 2 to 8."""
    return min(8, max(2, os.cpu_count() or 1))


class TelegramSettings(BaseModel):
    token: SecretStr | None = None
    mode: Literal["polling", "webhook"] = "polling"
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = 8443
    base_url: str | None = None  # Bot API server (tests, or a self-hosted Bot API)
    base_file_url: str | None = None
    allowed_users: list[int] = Field(default_factory=list)
    allowed_chats: list[int] = Field(default_factory=list)
    admins: list[int] = Field(default_factory=list)  # user ids: admin commands, no quota
    rate_limit_per_minute: int = 10
    default_prompt: str = "Describe this image in one or two sentences."

    @property
    def enabled(self) -> bool:
        return self.token is not None


class SlackSettings(BaseModel):
    bot_token: SecretStr | None = None
    app_token: SecretStr | None = None  # xapp-...: Socket Mode
    signing_secret: SecretStr | None = None  # HTTP Events API
    mode: Literal["socket", "http"] = "socket"
    listen: str = "127.0.0.1"
    port: int = 3000
    base_url: str | None = None  # Web API base (tests)
    slash_command: str = "/vlbot"
    answer_in_channel: bool = True
    follow_all_thread_messages: bool = True  # plain replies in threads the bot answers in
    allowed_teams: list[str] = Field(default_factory=list)
    allowed_channels: list[str] = Field(default_factory=list)
    admins: list[str] = Field(default_factory=list)  # user ids (U…): admin commands, no quota

    @property
    def enabled(self) -> bool:
        return self.bot_token is not None


class HttpSettings(BaseModel):
    enabled: bool | None = None  # None: on when no chat platform is configured
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: list[SecretStr] = Field(default_factory=list)
    allow_remote_images: bool = False
    rate_limit_per_minute: int = 60
    web_user: str | None = None
    web_password: SecretStr | None = None
    log_dir: Path | None = None
    body_timeout_s: float = Field(default=30.0, gt=0)  # a request body stalled this long: 408
    metrics_public: bool = False  # /metrics without the API key even when keys are set
    admin_key: SecretStr | None = None  # the admin API's own key (None: no admin API)


class RemoteServer(BaseModel):
    """One server of the pool, with its own key and model name when they differ."""

    base_url: str
    api_key: SecretStr | None = None  # None: the pool's api_key
    model: str | None = None  # None: the pool's model


class RemoteSettings(BaseModel):
    """engine=openai: OpenAI-compatible servers (vLLM, llama.cpp server, Ollama, vlbot).

    One server: `base_url`. Several, sharing key and model: `base_urls` (a JSON list). Several
    with their own keys or model names: `servers` (a JSON list of {base_url, api_key, model}).
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    base_urls: list[str] = Field(default_factory=list)
    servers: list[RemoteServer] = Field(default_factory=list)
    api_key: SecretStr | None = None
    model: str = "Qwen/Qwen3-VL-2B-Instruct"
    timeout_s: float = Field(default=120.0, gt=0)  # longest wait for the next piece of a stream
    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_token_timeout_s: float = Field(default=60.0, gt=0)  # slower: try the next server
    health_interval_s: float = Field(default=10.0, gt=0)  # GET /models on each server
    max_backoff_s: float = Field(default=60.0, gt=0)  # longest wait before re-probing a down one

    def server_list(self) -> list[RemoteServer]:
        """Every server, with the shared key and model filled in where it has none of its own."""
        listed = self.servers or [RemoteServer(base_url=url) for url in self.base_urls]
        listed = listed or [RemoteServer(base_url=self.base_url)]
        return [
            RemoteServer(
                base_url=s.base_url, api_key=s.api_key or self.api_key, model=s.model or self.model
            )
            for s in listed
        ]


class TriageSettings(BaseModel):
    """Support-screenshot triage (bot/triage/): auto-triage places, routing, grouping, digest."""

    # images posted here without a mention are triaged (the /triage preset)
    slack_channels: list[str] = Field(default_factory=list)  # channel IDs (C0…)
    telegram_chats: list[int] = Field(default_factory=list)  # group chat ids
    rules: list[RoutingRule] = Field(default_factory=list)  # bot/triage/rules.py
    digest_hour: int | None = Field(default=9, ge=0, le=23)  # UTC; "off": no daily digest
    group_window_days: float = Field(default=14.0, gt=0)  # repeats matched this far back
    group_threshold: float = Field(default=85.0, ge=0, le=100)  # rapidfuzz score to group
    language: str = "en"  # of the digest and the routed summaries (en, zh)

    @field_validator("rules", mode="before")
    @classmethod
    def _rules(cls, value: object) -> list[RoutingRule]:
        return parse_rules(value)

    @field_validator("slack_channels")
    @classmethod
    def _channel_ids(cls, value: list[str]) -> list[str]:
        """Slack events name channels by ID: a #name here would never match one."""
        for channel in value:
            if not (channel.isascii() and channel.isalnum() and channel.isupper()):
                raise ValueError(f"{channel!r} is not a Slack channel ID: use the ID from the "
                                 "channel's details (C0…), not its #name")
        return value

    @field_validator("digest_hour", mode="before")
    @classmethod
    def _digest_off(cls, value: object) -> object:
        off = isinstance(value, str) and value.strip().lower() in ("", "off", "none", "null")
        return None if off else value


class WebhookEndpoint(BaseModel):
    """One receiver of outbound webhooks (bot/webhooks.py) and the secret it verifies with."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a wrong secret is still a secret

    url: str
    secret: SecretStr  # whsec_<base64>, as the Standard Webhooks libraries take it

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        """whsec_ + base64 of 24 to 64 bytes (the Standard Webhooks spec's sizes): a typo here
        would only show as every delivery refused by the receiver."""
        import base64
        import binascii

        text = value.get_secret_value()
        try:
            key = base64.b64decode(text.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not text.startswith("whsec_") or not 24 <= len(key) <= 64:
            raise ValueError(
                "a webhook secret is whsec_ followed by the base64 of 24 to 64 random bytes, e.g."
                " python -c \"import base64,os; print('whsec_'+base64.b64encode(os.urandom(32)).decode())\""
            )
        return value


class WebhookSettings(BaseModel):
    """Signed outbound webhooks from the durable outbox (bot/outbox.py, bot/webhooks.py)."""

    endpoints: list[WebhookEndpoint] = Field(default_factory=list)  # JSON: [{url, secret}]
    # triage.result: each triage; preset.result: every other preset's JSON result too
    events: list[Literal["triage.result", "preset.result"]] = ["triage.result"]
    max_attempts: int = Field(default=10, ge=1)  # then the event is dead-lettered ...
    max_age_s: float = Field(default=86_400.0, gt=0)  # ... or once it is this old
    backoff_s: float = Field(default=10.0, gt=0)  # first retry after 0.5-1x this, doubling
    max_backoff_s: float = Field(default=3_600.0, gt=0)
    timeout_s: float = Field(default=10.0, gt=0)  # one POST
    # hosts (names or IPs) that may resolve to private addresses: a receiver on the LAN
    allow_private_hosts: list[str] = Field(default_factory=list)
    retention_days: float = Field(default=7.0, gt=0)  # delivered events kept (dead ones stay)


class QuotaSettings(BaseModel):
    """Default quotas per user (HTTP: per API key), per UTC day; None: no limit. Admins may
    override them per user, chat/channel or API key at run time (bot/quotas.py)."""

    images_per_day: int | None = Field(default=None, ge=0)
    requests_per_day: int | None = Field(default=None, ge=0)
    engine_seconds_per_day: float | None = Field(default=None, ge=0)
    max_waiting: int | None = Field(default=None, ge=0)  # jobs queued or running at once


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VLBOT_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    data_dir: Path = Path("./data")
    # None: SQLite in data_dir; postgresql://user:pass@host/db: shared by replicas
    database_url: str | None = None
    job_lease_s: float = Field(default=30.0, gt=0)  # replicas: a dead replica's job moves after this

    # engine
    engine: Literal["auto", "qwen", "ocr", "openai"] = "auto"
    model: str = "Qwen/Qwen3-VL-2B-Instruct"
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    threads: int | None = None  # None: physical cores
    max_new_tokens: int = 512
    temperature: float = 0.0
    system_prompt: str | None = None
    max_image_mb: float = 10.0  # MiB (max_image_bytes = this x 1,048,576)
    max_visual_tokens: int = 1024  # pixel budget per image
    max_images_per_message: int = 10
    max_question_chars: int = 4000
    kv_cache_mb: int = 512  # all KV-cache memory: kept for follow-ups + chats being answered
    max_batch: int = Field(
        default=8, validation_alias=AliasChoices("VLBOT_MAX_BATCH", "BATCH_SIZE", "max_batch")
    )
    quantize: Literal["none", "int8", "int4"] = "none"
    ocr_hints: bool = False  # put the OCR engine's reading of each new image into the VLM prompt

    # runner
    max_concurrency: int = Field(
        default_factory=default_concurrency,
        validation_alias=AliasChoices("VLBOT_MAX_CONCURRENCY", "MAX_CONCURRENCY", "max_concurrency"),
    )
    max_queue: int = 100
    job_timeout_s: float = 300.0
    max_attempts: int = 3

    # history
    history_turns: int = 10  # earlier turns kept in the prompt
    retention_days: float = 30.0  # turns older than this are deleted from disk

    log_level: str = "INFO"

    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    slack: SlackSettings = Field(default_factory=SlackSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    triage: TriageSettings = Field(default_factory=TriageSettings)
    quota: QuotaSettings = Field(default_factory=QuotaSettings)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "vlbot.sqlite3"

    @property
    def database(self) -> Path | str:
        """What `Database.open` opens: the Postgres URL if set, else the SQLite file."""
        return self.database_url or self.db_path

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)

    def http_enabled(self) -> bool:
        if self.http.enabled is not None:
            return self.http.enabled
        return not (self.telegram.enabled or self.slack.enabled)
