"""Session fixtures for engine tests: tiny random-weight Qwen3-VL and Qwen2.5-VL model folders
(and a wider bf16 Qwen3-VL for memory tests, with helpers reading this process's memory).

Built once per test session under pytest's tmp folder (never in the working directory). Use with
`pytest_plugins = ["tests.engine_fixtures"]` (in the root conftest or a test module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

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


@pytest.fixture(scope="session")
def wide_qwen3(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3: Path) -> Path:
    """The tiny Qwen3-VL's shape with a wider vision tower (~6 M parameters) and a 131,072-row
    output head, saved in bfloat16: tensors of many pages, for what memory a load or a move keeps
    resident (a model folder without processor files: load it with from_pretrained only)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(tiny_qwen3))
    vision = config.vision_config
    vision.hidden_size, vision.intermediate_size, vision.num_heads = 512, 2048, 8
    config.text_config.vocab_size = 131072
    auto_model: Any = AutoModelForImageTextToText
    model = auto_model.from_config(config, dtype=torch.bfloat16)
    out = tmp_path_factory.mktemp("models") / "wide-qwen3"
    model.save_pretrained(out)
    return out


def resident_file_bytes(path: Path) -> int:
    """Bytes of the file at `path` resident in this process (its mappings' Rss in smaps)."""
    resident, inside = 0, False
    target = str(path.resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[5] == target
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1]) * 1024
    return resident


def reset_peak_rss() -> int:
    """Reset this process's peak resident memory (VmHWM) to the current one and return it; skip
    the test where the kernel does not allow it (Linux before 4.0, /proc read-only)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as e:
        pytest.skip(f"cannot reset the peak resident memory here ({e})")
    return peak_rss()


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM) in bytes."""
    from benchmarks.helpers import proc_status_bytes

    peak = proc_status_bytes("VmHWM")
    assert peak is not None
    return peak
