"""A stored conversation as Markdown (the JSON form is HistoryStore.export)."""

from __future__ import annotations

import datetime as dt
from typing import Any

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif",
              "image/heic": "heic", "image/heif": "heif", "image/bmp": "bmp", "image/tiff": "tiff"}


def image_file_name(part: dict[str, Any]) -> str:
    """How an exported conversation refers to an image: its hash, with the type's extension."""
    return f"{part['image'][:16]}.{EXTENSIONS.get(part.get('mime') or '', 'bin')}"


def to_markdown(export: dict[str, Any]) -> str:
    """`export` is HistoryStore.export(...): turns with text and image references."""
    lines = [f"# Conversation {export['conversation']}", ""]
    if not export["turns"]:
        lines.append("_(no stored turns)_")
    for turn in export["turns"]:
        when = dt.datetime.fromtimestamp(turn["created_at"], dt.timezone.utc)
        who = "You" if turn["role"] == "user" else "vlbot"
        lines.append(f"## {who} — {when:%Y-%m-%d %H:%M} UTC")
        lines.append("")
        for part in turn["parts"]:
            if "image" in part:
                label = part.get("name") or "image"
                size = f", {part['size']} bytes" if part.get("size") else ""
                lines.append(f"![{label}]({image_file_name(part)}) <!-- sha256 {part['image']}{size} -->")
            else:
                lines.append(part["text"])
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
