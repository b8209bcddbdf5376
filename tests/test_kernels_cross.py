"""The portable C kernels against a scalar C reference (tests/native/kernel_check.c), built for
each x86 tier this machine runs and cross-built for aarch64 (NEON; NEON with dotprod/i8mm/bf16)
and run under qemu-user; and every C kernel meant for aarch64 builds with the cross compiler.

Needs gcc-aarch64-linux-gnu and qemu-user (Debian; scripts/test installs them where it may):
without them the aarch64 cases are skipped, saying which is missing. Speed on ARM cannot be
measured here, only correctness.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.cpu import tiers
from engine.cpu.native import COMMON_FLAGS, KERNELS
from tests.tier_helpers import tier_or_skip

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "native" / "kernel_check.c"
CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")
# x86-only kernels: their wrappers offer them only on AVX-512 / AMX tiers, never on aarch64
X86_ONLY = {"gelu_tanh", "int8_screen", "prefill_ops", "vision_flash"}
ARM_MARCHES = {"neon": "-march=armv8.2-a", "neon+dotprod+i8mm+bf16": "-march=armv8.2-a+dotprod+i8mm+bf16"}


def build_driver(compiler: str, flags: tuple[str, ...], out: Path) -> Path:
    command = [
        compiler, "-O2", "-fopenmp", "-ffp-contract=off", *flags, "-I", str(KERNELS), "-o", str(out),
        str(DRIVER), "-lm",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def cross_tools_or_skip(need_qemu: bool = True) -> str:
    compiler = shutil.which(CROSS_CC)
    if compiler is None or not SYSROOT.is_dir():
        pytest.skip(f"no aarch64 cross compiler ({CROSS_CC}: apt-get install gcc-aarch64-linux-gnu)")
    if need_qemu and shutil.which(QEMU) is None:
        pytest.skip(f"no user-mode emulator ({QEMU}: apt-get install qemu-user)")
    return compiler


@pytest.mark.parametrize("tier", ["avx2", "avx512", "avx512_bf16", "amx"])
def test_portable_kernels_match_the_scalar_reference_on_x86(tier: str, tmp_path: Path) -> None:
    tier_or_skip(tier)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    flags = tiers.choose(tier, tiers.cpu_flags()).compile_flags
    binary = build_driver(compiler, flags, tmp_path / "check")
    result = subprocess.run([binary], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    lanes = {"avx2": 8}.get(tier, 16)
    assert f"ok: 0 failure(s), vector of {lanes} floats" in result.stdout


@pytest.mark.parametrize("march", sorted(ARM_MARCHES))
def test_portable_kernels_match_the_scalar_reference_on_aarch64(march: str, tmp_path: Path) -> None:
    compiler = cross_tools_or_skip()
    binary = build_driver(compiler, (ARM_MARCHES[march],), tmp_path / "check-aarch64")
    result = subprocess.run(
        [QEMU, "-cpu", "max", "-L", str(SYSROOT), str(binary)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: 0 failure(s), vector of 4 floats" in result.stdout


def arm_kernels() -> list[str]:
    return sorted(p.stem for p in KERNELS.glob("*.c") if p.stem not in X86_ONLY)


@pytest.mark.parametrize("kernel", arm_kernels())
def test_every_arm_kernel_builds_with_the_cross_compiler(kernel: str, tmp_path: Path) -> None:
    compiler = cross_tools_or_skip(need_qemu=False)
    flags = tiers.detect(frozenset({"asimd", "asimddp", "i8mm", "bf16"}), "aarch64").compile_flags
    out = tmp_path / f"{kernel}.so"
    command = [compiler, *COMMON_FLAGS, *flags, "-o", str(out), str(KERNELS / f"{kernel}.c")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
