"""engine=auto: the VLM when its weights can be had, else OCR with a one-time notice."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from bot import texts
from bot.engine_port import Engine, ModelNotFound
from bot.models import GenerationParams, ImagePart, Message
from engine.auto import FALLBACK_NOTICE, AutoEngine, Availability, vlm_availability
from tests.fakes import ScriptedEngine

PARAMS = GenerationParams()


def no_vlm() -> Engine:
    raise AssertionError("the VLM must not be built when it is not available")


class BrokenVlm(ScriptedEngine):
    closed: bool = False

    async def load(self) -> None:
        raise ModelNotFound("config.json is missing")

    async def close(self) -> None:
        self.closed = True


def shot() -> ImagePart:
    image = Image.new("RGB", (640, 160), "white")
    draw = ImageDraw.Draw(image)
    draw.text((24, 50), "Upload failed: file too large", font=ImageFont.load_default(26),
              fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return ImagePart(buffer.getvalue(), "image/png", "shot.png")


async def ask(engine: Engine, message: Message, params: GenerationParams = PARAMS) -> str:
    await engine.load()
    return "".join([p async for p in engine.stream([], message, params)])


def test_availability_of_local_folders_cache_and_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "model").mkdir()
    assert not vlm_availability(str(tmp_path / "model")).available  # no config.json
    (tmp_path / "model" / "config.json").write_text("{}")
    assert vlm_availability(str(tmp_path / "model")) == Availability(True, "local folder")
    assert not vlm_availability(str(tmp_path / "missing")).available
    assert not vlm_availability("./models/qwen").available  # a path, not a hub id
    # a hub id: found in the HF cache, else not when offline (no network call)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    offline = vlm_availability("Qwen/Qwen3-VL-2B-Instruct")
    assert not offline.available and "HF_HUB_OFFLINE" in offline.where
    snapshot = tmp_path / "hf" / "models--Qwen--Qwen3-VL-2B-Instruct"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("abc123")
    (snapshot / "snapshots" / "abc123").mkdir(parents=True)
    (snapshot / "snapshots" / "abc123" / "config.json").write_text("{}")
    assert vlm_availability("Qwen/Qwen3-VL-2B-Instruct") == Availability(True, "hf cache")


def _ocr_factory() -> Callable[[], Engine]:
    pytest.importorskip("rapidocr_onnxruntime")
    from engine.ocr.engine import OcrEngine

    return OcrEngine


def unreachable(model: str) -> Availability:
    return Availability(False, f"{model}: not in the Hugging Face cache and the hub cannot be reached")


async def test_a_missing_local_folder_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    engine = AutoEngine(str(tmp_path / "no-model-here"), no_vlm, _ocr_factory())
    with pytest.raises(ModelNotFound, match="no such model folder"):
        await engine.load()


async def test_no_model_falls_back_to_ocr_with_a_one_time_notice(tmp_path: Path) -> None:
    engine = AutoEngine("Qwen/no-model-here", no_vlm, _ocr_factory(), probe=unreachable)
    assert engine.info.name == "auto" and not engine.ready
    engine.check(Message.of("?", shot()))  # intake checks work before an engine is picked
    answer = await ask(engine, Message.of("What does it say?", shot()))
    assert answer == "Upload failed: file too large"
    assert engine.fallback and engine.notice == FALLBACK_NOTICE
    assert "no-model-here" in (engine.fallback_reason or "")
    info = engine.info  # what /health shows
    assert info.name == "ocr" and info.details["engine"] == "auto" and "fallback" in info.details
    # the notice once per conversation, in the user's language
    assert engine.take_notice("telegram:1") == FALLBACK_NOTICE
    assert engine.take_notice("telegram:1") is None
    assert engine.take_notice("slack:C1") == FALLBACK_NOTICE
    assert "OCR" in texts.text(FALLBACK_NOTICE, "en") and "OCR" in texts.text(FALLBACK_NOTICE, "zh")
    as_json = json.loads(await ask(engine, Message.of("[vlbot:ocr-json]", shot())))
    assert as_json["lines"][0]["text"] == "Upload failed: file too large"
    await engine.close()


async def test_a_vlm_that_fails_to_load_falls_back_too(tmp_path: Path) -> None:
    broken = BrokenVlm()
    engine = AutoEngine("Qwen/broken", lambda: broken, _ocr_factory(),
                        probe=lambda m: Availability(True, "hf cache"))
    assert await ask(engine, Message.of("?", shot())) == "Upload failed: file too large"
    assert broken.closed and engine.fallback
    assert "config.json is missing" in (engine.fallback_reason or "")


async def test_available_model_uses_the_vlm(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    vlm = ScriptedEngine(reply=lambda h, m: "a screenshot of an upload error")

    def no_ocr() -> Engine:
        raise AssertionError("OCR must not load when the VLM is available")

    engine = AutoEngine(str(tmp_path), lambda: vlm, no_ocr)
    assert (await ask(engine, Message.of("what is it?", shot()))).strip() == (
        "a screenshot of an upload error"
    )
    assert engine.chosen is vlm and not engine.fallback
    assert engine.notice is None and engine.take_notice("telegram:1") is None
    assert engine.info.details["engine"] == "auto"
