"""CPU tiers (engine.cpu.tiers): detected from the CPU's flags, forced lower with VLBOT_CPU,
refused higher with a clear message; kernels are built with the tier's own flags."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.cpu import native, tiers
from engine.cpu.kernels import bf16_kernel
from engine.qwen.loading import cpu_supports_bf16

ZEN3 = frozenset("fpu sse sse2 avx avx2 fma f16c bmi2".split())
ZEN5 = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"}
SAPPHIRE = ZEN5 | {"amx_tile", "amx_bf16", "amx_int8"}
GRAVITON3 = frozenset("fp asimd evtstrm aes crc32 asimddp sha512 sve i8mm bf16".split())


@pytest.fixture
def fresh_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tiers.active_tier.cache_clear()
    bf16_kernel.load_kernel.cache_clear()
    yield
    tiers.active_tier.cache_clear()
    bf16_kernel.load_kernel.cache_clear()


@pytest.mark.parametrize(
    ("flags", "machine", "expected"),
    [
        (ZEN3, "x86_64", "avx2"),
        (ZEN5, "x86_64", "avx512_bf16"),
        (SAPPHIRE, "x86_64", "amx"),
        (ZEN5 - {"avx512_vnni"}, "x86_64", "avx512"),
        (ZEN3 - {"f16c"}, "x86_64", "generic"),
        (GRAVITON3, "aarch64", "aarch64"),
    ],
)
def test_the_best_tier_follows_the_cpu_flags(flags: frozenset[str], machine: str, expected: str) -> None:
    assert tiers.detect(flags, machine).name == expected


def test_each_tier_compiles_with_its_own_flags_never_native() -> None:
    avx2 = tiers.choose("avx2", SAPPHIRE, "x86_64")
    assert avx2.compile_flags == ("-mavx2", "-mfma", "-mf16c")
    assert not avx2.has("avx512f") and not avx2.bf16_arithmetic
    top = tiers.choose("native", SAPPHIRE, "x86_64")
    assert "-mamx-bf16" in top.compile_flags and top.bf16_arithmetic
    assert all("native" not in flag for flag in top.compile_flags)
    arm = tiers.detect(GRAVITON3, "aarch64")
    assert arm.compile_flags == ("-march=armv8.2-a+dotprod+i8mm+bf16",) and arm.has("asimddp")
    assert tiers.detect(frozenset({"fp", "asimd"}), "aarch64").compile_flags == ("-march=armv8.2-a",)


def test_a_tier_above_the_cpu_is_refused_with_what_it_lacks() -> None:
    with pytest.raises(tiers.TierError, match=r"lacks \(avx512_bf16, avx512_vnni, .*best tier is avx2"):
        tiers.choose("avx512_bf16", ZEN3, "x86_64")
    with pytest.raises(tiers.TierError, match="not a CPU tier here: use one of generic, avx2"):
        tiers.choose("sse9", ZEN5, "x86_64")
    assert tiers.choose(" AVX2 ", ZEN5, "x86_64").name == "avx2"


def test_the_cpuinfo_parser_reads_x86_and_arm() -> None:
    x86 = "processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2 fma\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n"
    assert tiers.parse_cpu_flags(x86) == {"fpu", "avx2", "fma"}
    assert tiers.parse_cpu_flags(arm) == {"fp", "asimd", "asimddp"}


def test_vlbot_cpu_forces_the_process_tier_and_its_kernel_builds(
    fresh_tier: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if tiers.detect(tiers.cpu_flags()).name in ("generic", "aarch64", "avx2"):
        pytest.skip("this CPU has no tier above avx2 to force down from")
    monkeypatch.setenv("VLBOT_CPU", "avx2")
    assert tiers.active_tier().name == "avx2"
    assert not cpu_supports_bf16()  # the dtype choice follows the forced tier
    if bf16_kernel.load_kernel() is not None:
        assert native.kernel_status()["bf16_matvec"] == "avx2"


def test_a_forced_tier_above_this_cpu_fails_clearly(
    fresh_tier: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    best = tiers.detect(tiers.cpu_flags())
    if best.name in ("amx", "aarch64"):
        pytest.skip(f"nothing above this CPU's tier ({best.name}) to ask for")
    monkeypatch.setenv("VLBOT_CPU", "amx")
    with pytest.raises(tiers.TierError, match=f"its best tier is {best.name}"):
        tiers.active_tier()


def doctor(tmp_path: Path, tier: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLBOT_CPU": tier, "VLBOT_DATA_DIR": str(tmp_path / "data")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", "doctor"], capture_output=True, text=True, env=env, timeout=300
    )


def test_doctor_prints_the_forced_tier_and_its_kernels(tmp_path: Path) -> None:
    if tiers.detect(tiers.cpu_flags()).name in ("generic", "aarch64"):
        pytest.skip("VLBOT_CPU=avx2 needs an x86 CPU with AVX2")
    out = doctor(tmp_path, "avx2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "CPU tier: avx2" in out.stdout
    kernels = next(line for line in out.stdout.splitlines() if line.startswith("C kernels in use:"))
    assert "bf16_matvec" in kernels and "decode_attention" in kernels and "gelu_tanh" in kernels
    assert "vision_flash_portable" not in kernels  # offered only on AVX-512 tiers
    assert "dtype that would be used: bfloat16 weights, float32 compute" in out.stdout


def test_doctor_refuses_a_tier_above_the_cpu(tmp_path: Path) -> None:
    if tiers.detect(tiers.cpu_flags()).name in ("amx", "aarch64"):
        pytest.skip("nothing above this CPU's tier to ask for")
    out = doctor(tmp_path, "amx")
    assert out.returncode == 1
    assert "VLBOT_CPU=amx asks for instructions this CPU lacks" in out.stdout + out.stderr
