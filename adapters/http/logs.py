"""The seed's three logs: access (one line per request), model (engine loading and one line per
generation) and error — separate loggers, `key=value` lines with the request id, stdout by default
(the root handler) and rotating files `api_access.log`, `model_loading.log`, `error.log` when a
log folder is set. Never image bytes, message text or keys at INFO."""

from __future__ import annotations

import logging
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

access_log = logging.getLogger("vlbot.http.access")
model_log = logging.getLogger("vlbot.model")
error_log = logging.getLogger("vlbot.http.error")

FILES = {
    "api_access.log": ["vlbot.http.access"],
    "model_loading.log": ["vlbot.model", "vlbot.engine", "vlbot.core"],
    "error.log": ["vlbot"],  # ERROR and above from every vlbot logger
}


def kv(**fields: Any) -> str:
    """`a=1 b="two words"`: one structured line."""
    out = []
    for key, value in fields.items():
        if value is None:
            continue
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{key}={text}")
    return " ".join(out)


class LogFiles:
    """Rotating file handlers for the three logs; `close()` detaches them again."""

    def __init__(self, folder: Path, max_bytes: int = 10 * 1024 * 1024, backups: int = 5) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._attached: list[tuple[logging.Logger, logging.Handler]] = []
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        for filename, names in FILES.items():
            handler = RotatingFileHandler(
                folder / filename, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
            handler.setFormatter(fmt)
            handler.setLevel(logging.ERROR if filename == "error.log" else logging.INFO)
            for filt in _root_filters():
                handler.addFilter(filt)  # the secret redactor of bot.logs, when installed
            for name in names:
                logger = logging.getLogger(name)
                if name != "vlbot" and (logger.level == logging.NOTSET or logger.level > logging.INFO):
                    logger.setLevel(logging.INFO)
                logger.addHandler(handler)
                self._attached.append((logger, handler))

    def close(self) -> None:
        handlers = set()
        for logger, handler in self._attached:
            logger.removeHandler(handler)
            handlers.add(handler)
        for handler in handlers:
            handler.close()
        self._attached.clear()


def _root_filters() -> list[logging.Filter]:
    filters: list[logging.Filter] = []
    for handler in logging.getLogger().handlers:
        filters.extend(f for f in handler.filters if isinstance(f, logging.Filter))
    return filters
