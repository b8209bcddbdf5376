"""The CPU tier vlbot's kernels are built for, detected once per process.

A tier is a set of instructions a kernel may use, with the compiler flags that enable exactly
those (never `-march=native`, so a forced tier really is that tier):

| tier | needs (Linux /proc/cpuinfo flags) | compiler flags |
|---|---|---|
| generic | nothing | none (plain C) |
| avx2 | avx2 fma f16c | -mavx2 -mfma -mf16c |
| avx512 | + avx512f avx512bw avx512vl avx512dq | + -mavx512f -mavx512bw -mavx512vl -mavx512dq |
| avx512_bf16 | + avx512_bf16 avx512_vnni | + -mavx512bf16 -mavx512vnni |
| amx | + amx_tile amx_bf16 amx_int8 | + -mamx-tile -mamx-bf16 -mamx-int8 |
| aarch64 | asimd (NEON); asimddp, i8mm, bf16 where present | -march=armv8.2-a+dotprod+i8mm+bf16 |

`VLBOT_CPU=generic|avx2|avx512|avx512_bf16|amx|native` in the environment forces a tier at or
below the machine's (`native`, or unset: the best this CPU runs); asking for one above it is
refused with `TierError`. `active_tier()` is the tier every kernel of this process is built for.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

ENVIRONMENT = "VLBOT_CPU"

# x86 tiers, lowest first: each holds the one before it
_X86: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("generic", (), ()),
    ("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
    (
        "avx512",
        ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"),
    ),
    ("avx512_bf16", ("avx512_bf16", "avx512_vnni"), ("-mavx512bf16", "-mavx512vnni")),
    ("amx", ("amx_tile", "amx_bf16", "amx_int8"), ("-mamx-tile", "-mamx-bf16", "-mamx-int8")),
)
X86_TIERS: tuple[str, ...] = tuple(name for name, _, _ in _X86)
# aarch64's optional extensions: /proc/cpuinfo feature -> -march extension
_ARM_EXTENSIONS = {"asimddp": "dotprod", "i8mm": "i8mm", "bf16": "bf16"}


class TierError(ValueError):
    """VLBOT_CPU names no tier, or one this CPU cannot run."""


@dataclass(frozen=True)
class Tier:
    """A CPU tier: its name, the CPU features it lets kernels use (cpuinfo's names) and the
    compiler flags that enable exactly those."""

    name: str
    features: frozenset[str]
    compile_flags: tuple[str, ...]

    def has(self, *features: str) -> bool:
        """Whether kernels of this tier may use all of `features` (cpuinfo flag names)."""
        return all(feature in self.features for feature in features)

    @property
    def bf16_arithmetic(self) -> bool:
        """Whether the tier multiplies bfloat16 natively (AVX512-BF16, AMX, ARM's bf16)."""
        return bool(self.features & {"avx512_bf16", "amx_bf16", "bf16"})

    @property
    def is_arm(self) -> bool:
        return self.name == "aarch64"


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of a /proc/cpuinfo text (x86 `flags`, aarch64 `Features`)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return frozenset()


def _x86_tier(name: str) -> Tier:
    features: set[str] = set()
    flags: list[str] = []
    for tier_name, needs, compile_flags in _X86:
        features.update(needs)
        flags.extend(compile_flags)
        if tier_name == name:
            return Tier(name, frozenset(features), tuple(flags))
    raise TierError(f"unknown CPU tier {name!r}")


def _arm_tier(flags: frozenset[str]) -> Tier:
    present = [feature for feature in _ARM_EXTENSIONS if feature in flags]
    march = "+".join(["-march=armv8.2-a", *(_ARM_EXTENSIONS[f] for f in present)])
    return Tier("aarch64", frozenset({"asimd", *present}), (march,))


def detect(flags: frozenset[str], machine: str | None = None) -> Tier:
    """The best tier a CPU with these flags runs (`machine`: platform.machine(), by default)."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return _arm_tier(flags)
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return Tier("generic", frozenset(), ())
    best = "generic"
    for name, needs, _ in _X86:
        if not all(need in flags for need in needs):
            break
        best = name
    return _x86_tier(best)


def choose(wanted: str, flags: frozenset[str], machine: str | None = None) -> Tier:
    """The tier `wanted` (a VLBOT_CPU value; "" or "native": the best) on a CPU with `flags`."""
    best = detect(flags, machine)
    key = wanted.strip().lower()
    if key in ("", "native"):
        return best
    if key == best.name:
        return best
    if best.is_arm or key not in X86_TIERS:
        choices = ", ".join([*X86_TIERS, "native"]) if not best.is_arm else "aarch64, native"
        raise TierError(f"{ENVIRONMENT}={wanted!r} is not a CPU tier here: use one of {choices}")
    if X86_TIERS.index(key) > X86_TIERS.index(best.name):
        missing = sorted(_x86_tier(key).features - flags)
        raise TierError(
            f"{ENVIRONMENT}={key} asks for instructions this CPU lacks ({', '.join(missing)}); "
            f"its best tier is {best.name}: set {ENVIRONMENT} to {best.name} or a lower tier, or unset it"
        )
    return _x86_tier(key)


@functools.lru_cache(maxsize=1)
def active_tier() -> Tier:
    """The tier of this process: VLBOT_CPU's, else the best this CPU runs. Raises TierError for
    a VLBOT_CPU this CPU cannot honour. Cached: call `active_tier.cache_clear()` after changing
    VLBOT_CPU (tests), and clear the kernels' own caches too."""
    return choose(os.environ.get(ENVIRONMENT, ""), cpu_flags())
