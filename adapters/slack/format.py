"""Slack text rules: mrkdwn escaping and splitting answers within Slack's size limits.

Slack's limits: a message's `text` is truncated past 40,000 characters, a section block's mrkdwn
text may hold at most 3,000, a message at most 50 blocks. An answer is escaped first (`&`, `<`,
`>` are the only characters Slack's mrkdwn requires escaped), then cut into block-sized chunks
(never inside an `&amp;`-style entity, preferably at a paragraph, line or word boundary), and the
chunks are grouped into pages: one page per Slack message.
"""

from __future__ import annotations

import re
from typing import Any

BLOCK_LIMIT = 3000  # characters of mrkdwn in one section block
TEXT_LIMIT = 40000  # characters of a message's `text` before Slack truncates it
PAGE_LIMIT = 12000  # characters per message we post: 4 blocks, readable on a phone
MENTION_RE = re.compile(r"<@[UW][A-Z0-9]+(?:\|[^>]*)?>")
# Who a message is addressed to: users (<@U123>), user groups and @here/@channel/@everyone.
ADDRESSED_RE = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>|<!(?:here|channel|everyone|subteam\^)[^>]*>")
# Links: Slack's <https://...|label> form (events, escaped commands) and bare URLs (commands).
LINK_RE = re.compile(r"<(https?://[^>|\s]+)(?:\|[^>]*)?>|(?<![<\w])(https?://[^\s<>]+)", re.IGNORECASE)


def escape(text: str) -> str:
    """Escape the three characters Slack's mrkdwn treats as control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def strip_mentions(text: str) -> str:
    """Remove `<@U123>` user mentions (the bot's handle) from a message's text."""
    return re.sub(r"[ \t]{2,}", " ", MENTION_RE.sub(" ", text)).strip()


def addresses_others(text: str, bot_user_id: str | None) -> bool:
    """Does the message mention anyone (a user, a group, @here...) other than the bot?"""
    return any(m.group(1) != bot_user_id for m in ADDRESSED_RE.finditer(text))


def split_links(text: str) -> tuple[str, list[str]]:
    """The text without its links, and the links (bare ones without trailing punctuation)."""
    links: list[str] = []

    def take(match: re.Match[str]) -> str:
        bare = match.group(2)
        url = match.group(1) or bare.rstrip(".,;:!?)]}'\"")
        links.append(url)
        return " " + bare[len(url):] if bare else " "

    rest = LINK_RE.sub(take, text)
    return re.sub(r"[ \t]{2,}", " ", rest).strip(), links


def _cut_point(text: str, limit: int) -> int:
    """Where to cut `text` (longer than `limit`) so the head fits: a boundary, never an entity."""
    window = text[:limit]
    for sep in ("\n\n", "\n", " "):
        at = window.rfind(sep)
        if at >= limit // 2:
            return at + len(sep)
    amp = window.rfind("&")
    if amp != -1 and ";" not in window[amp:]:
        return amp if amp > 0 else limit  # do not split "&amp;" and friends
    return limit


def split_escaped(text: str, limit: int = BLOCK_LIMIT) -> list[str]:
    """Cut already-escaped text into chunks of at most `limit` characters."""
    chunks: list[str] = []
    rest = text
    while len(rest) > limit:
        at = _cut_point(rest, limit)
        head, rest = rest[:at].rstrip(), rest[at:].lstrip()
        if head:
            chunks.append(head)
    if rest.strip() or not chunks:
        chunks.append(rest)
    return chunks


def pages(answer: str, page_limit: int = PAGE_LIMIT, block_limit: int = BLOCK_LIMIT) -> list[list[str]]:
    """The answer as pages (messages) of escaped block texts, each within Slack's limits."""
    chunks = split_escaped(escape(answer), block_limit)
    out: list[list[str]] = [[]]
    size = 0
    for chunk in chunks:
        if out[-1] and (size + len(chunk) > page_limit or len(out[-1]) >= 50):
            out.append([])
            size = 0
        out[-1].append(chunk)
        size += len(chunk)
    return out


def page_message(blocks: list[str]) -> dict[str, Any]:
    """chat.postMessage/chat.update arguments for one page: section blocks plus text fallback."""
    fallback = "\n".join(blocks)[:TEXT_LIMIT]
    return {
        "text": fallback,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": b}} for b in blocks],
    }


def streaming_text(text_so_far: str, limit: int = BLOCK_LIMIT) -> str:
    """What a placeholder shows while the answer streams: its escaped tail, within one block."""
    shown = escape(text_so_far.strip()) + " …"
    if len(shown) <= limit:
        return shown
    tail = shown[-(limit - 2) :]
    amp = tail.find(";")
    if 0 <= amp < 6 and "&" not in tail[:amp]:
        tail = tail[amp + 1 :]  # the cut landed inside an entity: drop its rest
    return "…" + tail
