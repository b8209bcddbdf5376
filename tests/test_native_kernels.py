"""Building and loading the C kernels (engine.cpu.native): cached by source, and torch's operators
wherever a kernel cannot be had (switched off, another CPU, no working compiler)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.cpu import native, tiers
from engine.cpu.kernels import bf16_kernel, int4_kernel
from engine.cpu.quant import Int4Linear


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty kernel cache under tmp_path, and no kernel loaded yet in this process."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tiers.active_tier.cache_clear()
    for module in (int4_kernel, bf16_kernel):
        module.load_kernel.cache_clear()
    yield tmp_path / "vlbot" / "kernels"
    tiers.active_tier.cache_clear()
    for module in (int4_kernel, bf16_kernel):
        module.load_kernel.cache_clear()


def test_each_kernel_is_built_once_and_reused(fresh_build: Path) -> None:
    if bf16_kernel.load_kernel() is None:
        pytest.skip("this machine cannot build the kernels")
    built = list(fresh_build.glob("bf16_matvec-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    bf16_kernel.load_kernel.cache_clear()
    assert bf16_kernel.load_kernel() is not None
    assert list(fresh_build.glob("bf16_matvec-*.so")) == built
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_a_failing_compiler_leaves_torch_kernels(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/bin/false")
    assert int4_kernel.load_kernel() is None and bf16_kernel.load_kernel() is None
    assert not fresh_build.exists() or not list(fresh_build.glob("*.so"))
    layer = Int4Linear.from_linear(nn.Linear(128, 16, bias=False), 128, int4_kernel.load_kernel())
    assert layer.kernel_name == "torch"
    assert layer(torch.randn(1, 128)).shape == (1, 16)


def test_a_tier_without_the_instructions_is_not_offered_the_kernel(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLBOT_CPU", "generic")  # below every kernel's needs on any x86 CPU
    if tiers.active_tier().is_arm:
        pytest.skip("VLBOT_CPU names x86 tiers only")
    assert int4_kernel.load_kernel() is None and bf16_kernel.load_kernel() is None
    assert native.kernel_status()["bf16_matvec"].startswith("not on tier generic")


def test_kernels_can_be_switched_off(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLBOT_NATIVE_KERNELS", "off")
    assert int4_kernel.load_kernel() is None and bf16_kernel.load_kernel() is None
