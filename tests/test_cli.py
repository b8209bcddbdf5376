"""`vlbot` as a user runs it: ask on the tiny model, doctor, and one clear line for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


def vlbot(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
          timeout: float = 180) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout,
    )


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(path)
    return path


def test_ask_streams_an_answer_on_the_tiny_model(tiny_qwen3: Path, photo: Path,
                                                 tmp_path: Path) -> None:
    out = vlbot("ask", "--model", str(tiny_qwen3), "--max-new-tokens", "8", "--json",
                str(photo), "What colour is this?", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["answer"]
    assert result["stats"]["visual_tokens"] == 300  # 640x480 → 20x15 merged patches
    assert result["stats"]["completion_tokens"] <= 8
    assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == [photo]  # nothing written to the working directory

    plain = vlbot("ask", "--model", str(tiny_qwen3), "--max-new-tokens", "8", str(photo),
                  "What colour is this?")
    assert plain.returncode == 0 and plain.stdout.strip() == result["answer"]


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing-model", "no such model folder"),
        ("corrupt-model", "config.json"),
        ("not-an-image", "not an image"),
        ("empty-question", "Please send an image"),
        ("missing-file", "no such image file"),
    ],
)
def test_bad_input_gets_one_clear_line(setup: str, expected: str, tmp_path: Path,
                                       photo: Path, tiny_qwen3: Path) -> None:
    model = str(tiny_qwen3)
    args = [str(photo), "What is it?"]
    if setup == "missing-model":
        model = str(tmp_path / "nowhere")
    elif setup == "corrupt-model":
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.json").write_text("{ not json")
        model = str(broken)
    elif setup == "not-an-image":
        fake = tmp_path / "notes.jpg"
        fake.write_text("this is text, not a JPEG")
        args = [str(fake), "What is it?"]
    elif setup == "empty-question":
        args = ["   "]
    elif setup == "missing-file":
        args = [str(tmp_path / "gone.png"), "What is it?"]
    out = vlbot("ask", "--model", model, *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("vlbot: ") and expected.lower() in lines[-1].lower()
    assert "Traceback" not in out.stderr


def test_doctor_masks_secrets_and_reports_cpu(tmp_path: Path) -> None:
    token = "123456:ABCdefGhIJKlmnoPQRstuvWXyz0123456789"
    out = vlbot("doctor", env={"VLBOT_TELEGRAM__TOKEN": token,
                               "VLBOT_DATA_DIR": str(tmp_path / "data")})
    assert out.returncode == 0, out.stderr
    assert token not in out.stdout and "1234…(" in out.stdout
    assert "dtype that would be used:" in out.stdout
    assert "not downloaded yet" in out.stdout or "cache" in out.stdout


@pytest.mark.parametrize("folder", ["nowhere", "empty"])
def test_doctor_fails_on_a_model_folder_ask_cannot_use_in_ask_s_words(
    folder: str, tmp_path: Path, photo: Path
) -> None:
    model = tmp_path / folder
    if folder == "empty":
        model.mkdir()  # a folder, but no saved model in it
    env = {"VLBOT_MODEL": str(model), "VLBOT_DATA_DIR": str(tmp_path / "data")}
    out = vlbot("doctor", env=env)
    assert out.returncode == 1, out.stdout
    assert "fetched from the Hugging Face hub" not in out.stdout
    asked = vlbot("ask", str(photo), "What is it?", env=env)
    assert asked.returncode == 2
    said = asked.stderr.strip().splitlines()[-1]
    assert said.startswith("vlbot: no such model folder" if folder == "nowhere" else "vlbot: ")
    assert out.stderr.strip().splitlines() == [said]  # the same check, the same words
    assert said.removeprefix("vlbot: ") in out.stdout


def test_unwritable_data_folder_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data folder should be")
    out = vlbot("serve", env={"VLBOT_DATA_DIR": str(blocker / "data"),
                              "VLBOT_HTTP__ENABLED": "true"})
    assert out.returncode == 2
    assert "VLBOT_DATA_DIR" in out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr


def test_ask_with_the_ocr_engine_prints_the_screenshot_text(tmp_path: Path) -> None:
    pytest.importorskip("rapidocr_onnxruntime")
    from tests.ocr_images import error_dialog

    shot = tmp_path / "shot.png"
    shot.write_bytes(error_dialog("DejaVu Sans", 24).png())
    out = vlbot("ask", "--engine", "ocr", str(shot), "What does it say?")
    assert out.returncode == 0, out.stderr
    assert "Error 402: Your card was declined." in out.stdout

    as_json = vlbot("ask", "--engine", "ocr", "--preset", "ocr", "--json", str(shot), "read it")
    assert as_json.returncode == 0, as_json.stderr
    lines = [line["text"] for line in json.loads(as_json.stdout)["lines"]]
    assert "Payment failed" in lines
