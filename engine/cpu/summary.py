"""What this process's CPU work runs on, in words: the CPU tier (engine.cpu.tiers) and each C
kernel's state (engine.cpu.native.kernel_status). `vlbot doctor`, /health (through the engine's
EngineInfo.details) and the benchmark report print it."""

from __future__ import annotations

import importlib

from engine.cpu.native import kernel_status
from engine.cpu.tiers import TierError, active_tier

# each kernel's loader: (module under engine.cpu.kernels, function)
LOADERS = (
    ("bf16_kernel", "load_kernel"), ("decode_ops", "load_ops"), ("decode_attention", "load_attention"),
    ("prefill_ops", "load_ops"), ("gelu", "load_kernel"), ("vision_attention", "load_kernel"),
    ("vision_flash", "load_kernel"), ("vision_flash_portable", "load_kernel"),
    ("output_head", "load_screen"), ("int8_kernel", "load_kernel"), ("int4_kernel", "load_kernel"),
    ("bf16_gemm", "load_kernel"),
)  # fmt: skip


def _load_all() -> None:
    for module, function in LOADERS:
        try:
            loader = getattr(importlib.import_module(f"engine.cpu.kernels.{module}"), function)
        except (ImportError, AttributeError):  # a kernel this checkout does not have
            continue
        loader()


def cpu_summary(build: bool = False) -> dict[str, str]:
    """{"cpu_tier": the tier, "kernels": the kernels in use on it, "kernels_not_here": the others
    with why}. `build`: load every kernel first (builds them on first use: seconds), else report
    only those the process has loaded so far."""
    try:
        tier = active_tier()
    except TierError as e:
        return {"cpu_tier": f"refused: {e}"}
    if build:
        _load_all()
    status = kernel_status()
    used = sorted(name for name, state in status.items() if state == tier.name)
    other = sorted(f"{name} ({state})" for name, state in status.items() if state != tier.name)
    summary = {"cpu_tier": tier.name, "kernels": ", ".join(used) or "none"}
    if other:
        summary["kernels_not_here"] = "; ".join(other)
    return summary
