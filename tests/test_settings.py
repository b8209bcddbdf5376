"""Settings: every one documented in .env.example, which parses; seed variable names honoured."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def documented_names() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#?\s*(VLBOT_[A-Z0-9_]+)=", text, flags=re.M))


def setting_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            names |= {f"VLBOT_{name.upper()}__{k.upper()}" for k in sub.model_fields}
        else:
            names.add(f"VLBOT_{name.upper()}")
    return names


def test_every_setting_is_in_env_example_with_a_comment() -> None:
    assert setting_names() - documented_names() == set()
    assert documented_names() - setting_names() == set()
    lines = (ROOT / ".env.example").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^#?\s*VLBOT_", line):
            j = i - 1
            while j >= 0 and re.match(r"^#?\s*VLBOT_", lines[j]):
                j -= 1  # a group of related settings shares one comment
            assert lines[j].startswith("# "), f"no comment above {line}"


def test_env_example_parses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=ROOT / ".env.example")  # type: ignore[call-arg]
    assert settings.model == "Qwen/Qwen3-VL-2B-Instruct"
    assert settings.telegram.token is None and not settings.telegram.enabled
    assert settings.http_enabled()


def test_nested_and_seed_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLBOT_TELEGRAM__TOKEN", "1:abc")
    monkeypatch.setenv("VLBOT_TELEGRAM__ALLOWED_USERS", "[1, 2]")
    monkeypatch.setenv("MAX_CONCURRENCY", "3")
    settings = Settings()
    assert settings.telegram.enabled and settings.telegram.allowed_users == [1, 2]
    assert settings.max_concurrency == 3
    assert not settings.http_enabled()  # a chat platform is configured
