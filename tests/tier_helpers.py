"""Running a test once per CPU tier (engine.cpu.tiers): every x86 tier from avx2 up, each forced
with VLBOT_CPU in this process (the tier and the kernels' caches cleared around it); a tier this
CPU lacks is skipped with the reason."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from engine.cpu import tiers

KERNEL_TIERS = ("avx2", "avx512", "avx512_bf16", "amx", "aarch64")


def tier_or_skip(name: str) -> None:
    """Skip unless this CPU can run tier `name`."""
    best = tiers.detect(tiers.cpu_flags())
    if best.is_arm or name == "aarch64":
        if name != best.name:
            pytest.skip(f"tier {name} cannot run on this {best.name} CPU")
        return
    if tiers.X86_TIERS.index(name) > tiers.X86_TIERS.index(best.name):
        pytest.skip(f"this CPU's best tier is {best.name}: it cannot run tier {name}")


@contextlib.contextmanager
def forced(monkeypatch: pytest.MonkeyPatch, name: str, *caches: Any) -> Iterator[None]:
    """Force tier `name` (skipping where the CPU lacks it); clear `caches` (lru_cache'd loaders)
    before and after."""
    tier_or_skip(name)
    monkeypatch.setenv("VLBOT_CPU", "native" if name == "aarch64" else name)
    clear = [tiers.active_tier.cache_clear, *(c.cache_clear for c in caches)]
    for function in clear:
        function()
    assert tiers.active_tier().name == name
    try:
        yield
    finally:
        monkeypatch.delenv("VLBOT_CPU")
        for function in clear:
            function()

