"""Logging: structured one-line records, and no secret ever written.

Every secret value from the settings is registered with `SecretRedactor`, which replaces it in
each record's final text, whatever logger (ours, httpx, PTB, slack_sdk) produced it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable

from pydantic import SecretStr

from bot.settings import Settings

# Bot API URLs carry the token in their path: /bot<token>/method
_TELEGRAM_TOKEN_IN_URL = re.compile(r"/(file/)?bot\d+:[A-Za-z0-9_-]+")
_SLACK_TOKEN = re.compile(r"\bxox[abposr]-[A-Za-z0-9-]+|\bxapp-[A-Za-z0-9-]+")


class SecretRedactor(logging.Filter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        text = _TELEGRAM_TOKEN_IN_URL.sub(lambda m: f"/{m.group(1) or ''}bot***", text)
        return _SLACK_TOKEN.sub("xox***", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            formatted = logging.Formatter().formatException(record.exc_info)
            clean_exc = self.redact(formatted)
            if clean_exc != formatted:
                record.exc_text = clean_exc
        if clean != message:
            record.msg, record.args = clean, None
        return True


def secret_values(settings: Settings) -> list[str]:
    found: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif hasattr(value, "model_fields"):
            for name in type(value).model_fields:
                walk(getattr(value, name))

    walk(settings)
    return found


class KeyValueFormatter(logging.Formatter):
    """`2026-11-27T04:03:19 INFO vlbot.runner job abc done` — one line per record."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")


def setup_logging(settings: Settings, stream: object = None) -> SecretRedactor:
    redactor = SecretRedactor(secret_values(settings))
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(KeyValueFormatter())
    handler.addFilter(redactor)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # request lines of HTTP clients are noise at INFO (and carry Bot API tokens in URLs)
    for noisy in ("httpx", "httpcore", "telegram.ext.Updater", "slack_bolt", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return redactor
