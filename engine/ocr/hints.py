"""OCR hints: the VLM's prompt also carries the text the OCR engine read from the new images.

A 2B VLM at a ~1000-token pixel budget can miss small print; the OCR engine reads it at a higher
resolution. With hints on (VLBOT_OCR_HINTS=true) every new image costs one OCR pass (~1 s per
screenshot on 2 cores) before the VLM starts, and the prompt grows by the text found.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence

from bot.engine_port import Engine, EngineInfo
from bot.models import GenerationParams, Message, TextPart, Turn
from engine.ocr.engine import OcrEngine

logger = logging.getLogger("vlbot.engine.hints")

MAX_HINT_CHARS = 2000


def hinted(message: Message, rows_per_image: Sequence[Sequence[str]]) -> Message:
    """The message with the OCR text of its images put before the user's question."""
    blocks = []
    for number, rows in enumerate(rows_per_image, start=1):
        if rows:
            label = "the image" if len(rows_per_image) == 1 else f"image {number}"
            blocks.append(f"Text read from {label} by OCR (may contain errors):\n" + "\n".join(rows))
    if not blocks:
        return message
    hint = "\n\n".join(blocks)[:MAX_HINT_CHARS]
    return Message((*message.images, TextPart(hint), *(p for p in message.parts
                                                      if isinstance(p, TextPart))))


class OcrHintedEngine:
    """The Engine protocol over a VLM whose new images come with their OCR text."""

    def __init__(self, vlm: Engine, ocr: OcrEngine) -> None:
        self.vlm = vlm
        self.ocr = ocr

    @property
    def info(self) -> EngineInfo:
        inner = self.vlm.info
        return EngineInfo(inner.name, inner.model, inner.dtype, inner.threads,
                          {**inner.details, "ocr_hints": "on"})

    @property
    def ready(self) -> bool:
        return self.vlm.ready and self.ocr.ready

    @property
    def last_stats(self) -> object:
        return getattr(self.vlm, "last_stats", None)

    async def load(self) -> None:
        await self.ocr.load()
        await self.vlm.load()

    def check(self, message: Message) -> None:
        self.vlm.check(message)

    async def stream(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> AsyncGenerator[str, None]:
        rows = []
        for part in message.images:
            try:
                rows.append((await self.ocr.read(part)).rows)
            except Exception as exc:  # a hint is optional: the VLM still answers
                logger.info("no OCR hint for an image: %s", exc)
                rows.append(())
        inner = self.vlm.stream(history, hinted(message, rows), params)
        async with contextlib.aclosing(inner):  # closing this stream stops the VLM's too
            async for piece in inner:
                yield piece

    async def close(self) -> None:
        await self.vlm.close()
        await self.ocr.close()
