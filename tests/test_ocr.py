"""The OCR engine on generated screenshots: fonts and sizes, dark theme, a receipt, follow-ups."""

from __future__ import annotations

import difflib
import io
import json
import re
import time

import pytest
from PIL import Image

from bot.engine_port import Engine, EngineNotReady
from bot.models import GenerationParams, ImagePart, InputRejected, Message, Role, Turn
from bot.presets import PRESETS, generate_preset
from tests.ocr_images import available_fonts, error_dialog, found, receipt, settings_page

pytest.importorskip("rapidocr_onnxruntime")

from engine.ocr.engine import OcrEngine
from engine.ocr.reader import OcrReader, guess_language

PARAMS = GenerationParams()


@pytest.fixture(scope="module")
def reader() -> OcrReader:
    return OcrReader()


@pytest.fixture
async def engine(reader: OcrReader) -> OcrEngine:
    ocr = OcrEngine(reader=reader)
    await ocr.load()
    return ocr


def png(image: Image.Image) -> ImagePart:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return ImagePart(buffer.getvalue(), "image/png", "shot.png")


async def answer(engine: Engine, message: Message, history: list[Turn] | None = None,
                 params: GenerationParams = PARAMS) -> str:
    return "".join([piece async for piece in engine.stream(history or [], message, params)])


def test_reads_several_fonts_and_sizes(reader: OcrReader) -> None:
    fonts = available_fonts()
    assert len(fonts) >= 3, "install fonts-dejavu-core (and fonts-liberation) for the OCR tests"
    sizes = (14, 20, 28)
    sample = settings_page(fonts, sizes=sizes)
    started = time.monotonic()
    result = reader.read(sample.image)
    assert time.monotonic() - started < 30
    assert len(result.rows) == len(sample.expected)  # one row per line, top to bottom
    for (font, size), expected, row in zip(
        [(f, s) for f in fonts for s in sizes], sample.expected, result.rows, strict=True
    ):
        if size >= 20:  # read exactly
            assert row == expected, (font, size)
        else:  # 14 px: a letter may be lost ("Seting"), the line is still there
            similarity = difflib.SequenceMatcher(None, row, expected).ratio()
            assert similarity >= 0.9, (font, size, row)
    assert all(0.5 <= line.confidence <= 1.0 for line in result.lines)


def test_reads_a_dark_theme_dialog(reader: OcrReader) -> None:
    sample = error_dialog("DejaVu Sans", 18, dark=True)
    result = reader.read(sample.image)
    assert result.inverted
    missing = [e for e in sample.expected if not found(e, result.text)]
    assert not missing, f"not read: {missing}\nread:\n{result.text}"
    assert result.language == "en"
    # boxes are in the image's coordinates and in reading order
    tops = [line.top for line in result.lines]
    assert tops == sorted(tops) or result.rows[-1] == "Cancel Retry"
    assert all(0 <= x <= sample.image.width and 0 <= y <= sample.image.height
               for line in result.lines for x, y in line.box)


async def test_receipt_as_ocr_preset_json(engine: OcrEngine) -> None:
    sample = receipt()
    message = Message.of("", png(sample.image))
    result = await generate_preset(engine, [], message, PARAMS, PRESETS["ocr"])
    text = "\n".join(line["text"] for line in result.as_dict()["lines"])
    missing = [e for e in sample.expected if not found(e, text)]
    assert not missing, f"not read: {missing}\nread:\n{text}"
    assert result.as_dict()["language"] == "en"
    # a price stays on its item's row: reading order across the receipt's columns
    rows = engine.last_results[0].rows
    assert any(found("TOTAL EUR", row) and row.endswith("13.97") for row in rows), rows
    assert any(re.fullmatch(r"2 [x×] Espresso 5\.00", row) for row in rows), rows
    first = result.as_dict()["lines"][0]
    assert first["text"] == "CAFE AURORA" and 0.5 <= first["confidence"] <= 1
    assert len(first["box"]) == 4


async def test_plain_question_and_a_follow_up_without_the_image(engine: OcrEngine) -> None:
    sample = error_dialog("Liberation Sans", 22)
    image = png(sample.image)
    text = await answer(engine, Message.of("What does it say?", image))
    assert text.splitlines()[:2] == ["Payment failed", "Error 402: Your card was declined."]
    history = [
        Turn(Role.USER, Message.of("What does it say?", image).parts),
        Turn(Role.ASSISTANT, Message.of(text).parts),
    ]
    again = await answer(engine, Message.of("and the request id?"), history)
    assert "Request ID: req_8f3K29xQ" in again
    as_json = json.loads(
        await answer(engine, Message.of("[vlbot:ocr-json] transcribe"), history)
    )
    assert as_json["text"] == text and as_json["lines"][0]["text"] == "Payment failed"


async def test_no_text_and_no_image_get_clear_codes(engine: OcrEngine) -> None:
    blank = png(Image.new("RGB", (320, 200), "#f0f0f0"))
    with pytest.raises(InputRejected) as caught:
        await answer(engine, Message.of("what does it say?", blank))
    assert caught.value.code == "ocr_no_text"
    with pytest.raises(InputRejected) as caught:
        await answer(engine, Message.of("what does it say?"))
    assert caught.value.code == "no_image_yet"
    with pytest.raises(InputRejected) as caught:
        engine.check(Message.of("?", ImagePart(b"%PDF-1.7 ...", "image/png", "x.png")))
    assert caught.value.code == "not_an_image"


async def test_not_loaded_and_closed() -> None:
    ocr = OcrEngine()
    assert not ocr.ready and ocr.info.name == "ocr"
    with pytest.raises(EngineNotReady):
        await answer(ocr, Message.of("?"))
    assert isinstance(ocr, Engine)


def test_language_guess() -> None:
    assert guess_language("Payment failed") == "en"
    assert guess_language("支付失败 Error 402") == "zh"
    assert guess_language("12.50 / 3") == "unknown"
