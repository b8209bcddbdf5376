"""OCR hints: the VLM's prompt carries the text the OCR engine read from the new image."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from bot.models import GenerationParams, ImagePart, Message, TextPart, Turn
from tests.fakes import ScriptedEngine

pytest.importorskip("rapidocr_onnxruntime")


async def test_the_vlm_sees_the_ocr_text_before_the_question() -> None:
    from engine.ocr.engine import OcrEngine
    from engine.ocr.hints import OcrHintedEngine
    from tests.ocr_images import error_dialog

    seen: list[Message] = []

    def reply(history: Sequence[Turn], message: Message) -> str:
        seen.append(message)
        return "It says the card was declined."

    engine = OcrHintedEngine(ScriptedEngine(reply=reply), OcrEngine())
    await engine.load()
    shot = ImagePart(error_dialog("DejaVu Sans", 14).png(), "image/png", "shot.png")
    pieces = [p async for p in engine.stream([], Message.of("What went wrong?", shot),
                                             GenerationParams())]
    assert "".join(pieces).strip() == "It says the card was declined."
    asked = seen[0]
    assert asked.images == (shot,)  # the image is still there
    texts = [p.text for p in asked.parts if isinstance(p, TextPart)]
    assert texts[-1] == "What went wrong?"  # the question comes last
    assert "Text read from the image by OCR" in texts[0]
    assert "Your card was declined" in texts[0]
    await engine.close()
