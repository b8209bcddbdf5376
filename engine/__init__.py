"""engine: inference behind the Engine port (bot/engine_port.py). This module is the only part of
engine/ that the product outside it imports (bot/app.py and bot/cli.py, the composition root).

What it offers, each imported on first use through PEP 562's module `__getattr__` (the one
place vlbot uses it, typed through the TYPE_CHECKING imports below): `import engine` stays light,
and torch, transformers and onnxruntime load only when an engine that needs them is built —
importing every engine module up front costs ~4-5 s and ~200 MB more (measured on 2 cores, against
0.9 s for `import bot.app`), which `vlbot ask --engine openai` or `vlbot eval --engine ocr` would
pay for nothing:

- the engines: `QwenVLEngine` (Qwen-VL in transformers on CPU, engine/qwen/), `OcrEngine` and
  `OcrHintedEngine` (offline OCR alone, or its lines handed to the VLM as hints, engine/ocr/),
  `OpenAIRemoteEngine` (an OpenAI-compatible server, engine/remote/) and `RemotePool` (several,
  health-checked, least-busy, with failover), `AutoEngine` (the VLM where it can load, else
  OCR, engine/auto.py) with `local_model_problem` (what is wrong with a model setting that
  names a local folder, in `vlbot ask`'s words);
- image intake: `IntakeLimits`, `check_image`, `open_image` (engine/intake.py);
- what `vlbot doctor` reports: `physical_cores`, `cpu_supports_bf16`, `resolve_dtype`,
  `dtype_name`, `cpu_summary` (the CPU tier and its C kernels, engine/cpu/summary.py);
- `make_model` / `make_model_main`: the random-weight model builder behind
  `vlbot dev make-model` (engine/devmodel.py).

Subpackages: engine/qwen/ (the transformers engine), engine/cpu/ (CPU speed work and the C
kernels), engine/ocr/. engine/ imports from bot/ only bot.models and bot.engine_port, and never
adapters/ (tests/test_import_rules.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.auto import AutoEngine, local_model_problem
    from engine.cpu.summary import cpu_summary
    from engine.devmodel import main as make_model_main
    from engine.devmodel import make_model
    from engine.intake import IntakeLimits, check_image, open_image
    from engine.ocr.engine import OcrEngine
    from engine.ocr.hints import OcrHintedEngine
    from engine.qwen.engine import QwenVLEngine
    from engine.qwen.loading import cpu_supports_bf16, dtype_name, physical_cores, resolve_dtype
    from engine.remote import OpenAIRemoteEngine, RemotePool

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "QwenVLEngine": ("engine.qwen.engine", "QwenVLEngine"),
    "OcrEngine": ("engine.ocr.engine", "OcrEngine"),
    "OcrHintedEngine": ("engine.ocr.hints", "OcrHintedEngine"),
    "OpenAIRemoteEngine": ("engine.remote", "OpenAIRemoteEngine"),
    "RemotePool": ("engine.remote", "RemotePool"),
    "AutoEngine": ("engine.auto", "AutoEngine"),
    "local_model_problem": ("engine.auto", "local_model_problem"),
    "IntakeLimits": ("engine.intake", "IntakeLimits"),
    "check_image": ("engine.intake", "check_image"),
    "open_image": ("engine.intake", "open_image"),
    "physical_cores": ("engine.qwen.loading", "physical_cores"),
    "cpu_supports_bf16": ("engine.qwen.loading", "cpu_supports_bf16"),
    "resolve_dtype": ("engine.qwen.loading", "resolve_dtype"),
    "dtype_name": ("engine.qwen.loading", "dtype_name"),
    "cpu_summary": ("engine.cpu.summary", "cpu_summary"),
    "make_model": ("engine.devmodel", "make_model"),
    "make_model_main": ("engine.devmodel", "main"),
}

__all__ = [
    "AutoEngine",
    "IntakeLimits",
    "OcrEngine",
    "OcrHintedEngine",
    "OpenAIRemoteEngine",
    "QwenVLEngine",
    "RemotePool",
    "check_image",
    "cpu_summary",
    "cpu_supports_bf16",
    "dtype_name",
    "local_model_problem",
    "make_model",
    "make_model_main",
    "open_image",
    "physical_cores",
    "resolve_dtype",
]


def __getattr__(name: str) -> object:
    """Import a public name's module on first use (PEP 562)."""
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'engine' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
