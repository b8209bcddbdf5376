"""OcrEngine (`engine=ocr`): answers with the text found in the image, for machines with little
memory or without the vision-language model.

Fully offline: rapidocr-onnxruntime's wheel ships the PP-OCRv4 models (see engine.ocr.reader).
It reads the message's images (or, for a follow-up without one, the latest image of the
conversation) and answers with their text in reading order. With `params.preset == "ocr"` (or a
message that asks for the ocr preset's JSON) it answers with JSON instead: the text, its language,
and every line with its box and confidence. `last_results` holds the structured results of the
latest stream, and `read(image)` reads one image directly (for OCR hints in a VLM prompt).

OCR runs in a worker thread, one image at a time; the results for the last few images are kept,
so follow-up questions about the same image answer at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace
from typing import Any

from bot.engine_port import EngineInfo, EngineNotReady, ModelNotFound
from bot.models import GenerationParams, ImagePart, InputRejected, Message, Turn
from engine.intake import IntakeLimits, check_image, open_image
from engine.ocr.reader import OcrReader, OcrResult

logger = logging.getLogger("vlbot.engine.ocr")

OCR_MODEL = "PP-OCRv4 (rapidocr-onnxruntime)"
# Presets whose JSON this engine writes itself. A prompt carrying this marker asks for JSON too,
# so the preset layer works before GenerationParams has a `preset` field.
JSON_PRESETS = frozenset({"ocr"})
JSON_MARKER = "[vlbot:ocr-json]"
CACHE_SIZE = 16  # results kept for follow-up questions about the same images
DEFAULT_MAX_PIXELS = 4_200_000  # OCR reads small text: decode up to ~4 MP (a 2560x1600 screen)


class OcrEngine:
    """The Engine protocol over RapidOCR.

    Args:
        limits: the bot's intake limits (bytes, decoded pixels, aspect ratio); the pixel budget
            images are scaled into is raised to `max_pixels`, since OCR needs the detail a VLM's
            token budget would throw away.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice, the cores).
        min_confidence: lines the recogniser is less sure of are dropped.
        reader: an already loaded OcrReader to use (one set of models for several engines).
    """

    def __init__(
        self,
        *,
        limits: IntakeLimits | None = None,
        threads: int | None = None,
        min_confidence: float = 0.5,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        reader: OcrReader | None = None,
    ) -> None:
        base = limits or IntakeLimits()
        tokens = max(base.max_visual_tokens, math.ceil(max_pixels / base.token_pixels))
        self._limits = replace(base, max_visual_tokens=tokens)
        self._threads = threads
        self._min_confidence = min_confidence
        self._reader: OcrReader | None = reader  # a loaded reader may be shared between engines
        self._load_lock = asyncio.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        self._cache: OrderedDict[str, OcrResult] = OrderedDict()  # by image sha256: follow-ups
        self.last_results: list[OcrResult] = []

    # --- Engine protocol -----------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            name="ocr",
            model=OCR_MODEL,
            threads=self._threads or 0,
            details={
                "device": "cpu",
                "max_pixels": str(self._limits.max_pixels),
                "min_confidence": str(self._min_confidence),
            },
        )

    @property
    def ready(self) -> bool:
        return self._reader is not None

    @property
    def limits(self) -> IntakeLimits:
        return self._limits

    async def load(self) -> None:
        async with self._load_lock:
            if self._reader is not None:
                return
            if self._closed:
                raise EngineNotReady("the engine is closed")
            self._reader = await asyncio.to_thread(self._load_blocking)

    def check(self, message: Message) -> None:
        for part in message.images:
            check_image(part, self._limits)

    async def stream(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> AsyncGenerator[str, None]:
        if self._reader is None or self._closed:
            raise EngineNotReady("the OCR engine is not loaded" if not self._closed else "closed")
        images = list(message.images) or _latest_images(history)
        if not images:
            raise InputRejected("no_image_yet", "no image in the message or the conversation")
        results = [await self.read(part) for part in images]
        self.last_results = results
        if not any(result.lines for result in results):
            raise InputRejected("ocr_no_text", "no text found in the image")
        if wants_json(message, params):
            yield json.dumps(_json_answer(results), ensure_ascii=False)
            return
        yield format_text(results)

    async def close(self) -> None:
        self._closed = True
        await asyncio.to_thread(self._wait_idle)
        self._reader = None

    # --- reading -------------------------------------------------------------------------------

    async def read(self, part: ImagePart) -> OcrResult:
        """Decode (engine.intake: checks, EXIF orientation, RGB, pixel budget) and read one image."""
        reader = self._reader
        if reader is None:
            raise EngineNotReady("the OCR engine is not loaded")
        key = part.sha256
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        result = await asyncio.to_thread(self._read_blocking, reader, part)
        self._cache[key] = result
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def _read_blocking(self, reader: OcrReader, part: ImagePart) -> OcrResult:
        image = open_image(part, self._limits)
        with self._read_lock:
            result = reader.read(image)
        logger.info(
            "ocr %dx%d: %d lines, %.2f s%s",
            result.width,
            result.height,
            len(result.lines),
            result.seconds,
            " (dark theme, inverted)" if result.inverted else "",
        )
        return result

    def _load_blocking(self) -> OcrReader:
        try:
            return OcrReader(threads=self._threads, min_confidence=self._min_confidence)
        except ImportError as exc:
            raise ModelNotFound(
                "the OCR engine needs rapidocr-onnxruntime: pip install 'rapidocr-onnxruntime>=1.4,<2'"
                f" ({exc})"
            ) from exc

    def _wait_idle(self) -> None:
        with self._read_lock:
            pass


def wants_json(message: Message, params: GenerationParams) -> bool:
    preset = getattr(params, "preset", None)
    return preset in JSON_PRESETS or JSON_MARKER in message.text


def format_text(results: Sequence[OcrResult]) -> str:
    """The plain answer: each image's text in reading order; several images get a heading each."""
    if len(results) == 1:
        return results[0].text
    parts = []
    for number, result in enumerate(results, 1):
        parts.append(f"[{number}]\n{result.text}" if result.lines else f"[{number}]\n—")
    return "\n\n".join(parts)


def _json_answer(results: Sequence[OcrResult]) -> dict[str, Any]:
    """The ocr preset's shape: lines (text, confidence, box) in reading order and the language.
    Several images: their lines one after another, each line tagged with its image number."""
    lines: list[dict[str, Any]] = []
    for number, result in enumerate(results, 1):
        for line in result.lines:
            entry = line.to_dict()
            if len(results) > 1:
                entry["image"] = number
            lines.append(entry)
    text = format_text(results)
    languages = {result.language for result in results if result.lines}
    language = languages.pop() if len(languages) == 1 else ("mixed" if languages else "unknown")
    return {"language": language, "text": text, "lines": lines}


def _latest_images(history: Sequence[Turn]) -> list[ImagePart]:
    for turn in reversed(history):
        if turn.images:
            return list(turn.images)
    return []
