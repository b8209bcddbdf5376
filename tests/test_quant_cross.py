"""The quantized byte kernels (int8_matvec.c, int4_matvec.c) against a scalar C reference of
their arithmetic (tests/native/quant_check.c): built for each x86 tier this machine runs and
cross-built for aarch64 (NEON with dotprod: SDOT; plain NEON: the C fallback) and run under
qemu-user. Speed on ARM cannot be measured here, only correctness."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.cpu import tiers
from engine.cpu.native import KERNELS
from tests.test_kernels_cross import QEMU, SYSROOT, cross_tools_or_skip
from tests.tier_helpers import tier_or_skip

DRIVER = Path(__file__).resolve().parent / "native" / "quant_check.c"
ISA = {"avx2": "avx2", "avx512": "avx512bw", "avx512_bf16": "avx512_vnni", "amx": "avx512_vnni"}
ARM = {"-march=armv8.2-a+dotprod": "neon_dotprod", "-march=armv8-a": "generic"}


def build(compiler: str, flags: tuple[str, ...], out: Path) -> Path:
    command = [compiler, "-O2", "-fopenmp", *flags, "-I", str(KERNELS), "-o", str(out), str(DRIVER), "-lm"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.parametrize("tier", sorted(ISA))
def test_quantized_kernels_match_the_scalar_reference_on_x86(tier: str, tmp_path: Path) -> None:
    tier_or_skip(tier)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    binary = build(compiler, tiers.choose(tier, tiers.cpu_flags()).compile_flags, tmp_path / "check")
    result = subprocess.run([binary], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    assert f"ok: 0 failure(s), isa {ISA[tier]}" in result.stdout


@pytest.mark.parametrize("march", sorted(ARM))
def test_quantized_kernels_match_the_scalar_reference_on_aarch64(march: str, tmp_path: Path) -> None:
    compiler = cross_tools_or_skip()
    binary = build(compiler, (march,), tmp_path / "check-aarch64")
    result = subprocess.run(
        [QEMU, "-cpu", "max", "-L", str(SYSROOT), str(binary)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok: 0 failure(s), isa {ARM[march]}" in result.stdout
