"""Session fixtures for engine tests: tiny random-weight Qwen3-VL and Qwen2.5-VL model folders.

Built once per test session under pytest's tmp folder (never in the working directory). Use with
`pytest_plugins = ["tests.engine_fixtures"]` (in the root conftest or a test module).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import pytest

Kernel = TypeVar("Kernel")


def built_or_skip(kernel: Kernel | None, what: str) -> Kernel:
    """A C kernel's binding (engine.cpu.native), or skip the test where this machine cannot build or
    run it (another CPU, no compiler)."""
    if kernel is None:
        pytest.skip(f"this machine cannot build or run the {what}")
    return kernel


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.devmodel import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", "tiny", "qwen3")


@pytest.fixture(scope="session")
def tiny_qwen25(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.devmodel import main

    out = tmp_path_factory.mktemp("models") / "tiny-qwen2_5"
    assert main(["--size", "tiny", "--family", "qwen2_5", str(out)]) == 0
    return out
