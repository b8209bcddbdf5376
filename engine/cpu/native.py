"""Build and load vlbot's small C kernels (engine/cpu/kernels/*.c) at run time.

Each kernel is one C file (plus the shared headers beside it) compiled with the system C
compiler (`$CC`, else `cc`, else `gcc`) on first use into a cache directory
(`$XDG_CACHE_HOME/vlbot/kernels`, else `~/.cache/vlbot/kernels`), named by the hash of its
source, the headers and the flags, and loaded with ctypes (which releases the GIL during a call).
The libraries use OpenMP; the `libgomp.so.1` torch has already loaded satisfies them, so the
kernels share torch's thread pool.

Every kernel is compiled for the process's CPU tier (engine.cpu.tiers: the tier's own `-m`
flags, never `-march=native`, so `VLBOT_CPU=avx2` on an AVX-512 machine really builds AVX2 code)
and offered only where that tier has the instructions the kernel needs. Where it is not (a lower
tier, no compiler, a failed build), callers keep torch's own operators; the reason is logged once
and kept for `kernel_status()` (what `vlbot doctor`, /health and the benchmark report show).
`VLBOT_NATIVE_KERNELS=off` turns every kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.cpu.tiers import Tier, active_tier, cpu_flags

__all__ = [
    "F32", "I32", "I64", "POINTER", "Tier", "active_tier", "c_function", "cpu_flags",
    "kernel_status", "load_library", "note_not_used",
]

logger = logging.getLogger("vlbot.engine")

KERNELS = Path(__file__).with_name("kernels")
# the C argument types the kernels' functions take
POINTER, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")


# kernel source name -> "built for <tier>" or why it is not used (the last load of each)
_STATUS: dict[str, str] = {}


def kernel_status() -> dict[str, str]:
    """Each kernel loaded so far in this process: "<tier>" where it runs, else why not."""
    return dict(_STATUS)


def note_not_used(name: str, reason: str) -> None:
    """Record why kernel `name` is not used on the active tier though it could be built there (it
    lost to a library's operator there, or is unmeasured against it), for `kernel_status`."""
    _STATUS[name] = reason


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlbot" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(source: Path, flags: Sequence[str], compiler: str) -> Path:
    options = [*COMMON_FLAGS, *flags]
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(text + " ".join(options).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler, *options, "-o", str(built), str(source)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(built, target)  # atomic: a concurrent build yields the same file
    return target


def load_library(
    name: str, flags: Sequence[str] = (), cpu_needs: Sequence[str] = (), tier: Tier | None = None
) -> ctypes.CDLL | None:
    """engine/cpu/kernels/`name`.c built for `tier` (the process's active tier by default: its
    `-m` flags) plus the kernel's own `flags` (e.g. `-ffp-contract=off`), or None (reason
    logged) where the kernels are turned off, the tier lacks one of `cpu_needs` (cpuinfo flag
    names) or no compiler can build it."""
    if os.environ.get("VLBOT_NATIVE_KERNELS", "").strip().lower() in ("off", "0", "false", "no"):
        _STATUS[name] = "off (VLBOT_NATIVE_KERNELS)"
        return None
    tier = tier or active_tier()
    missing = [flag for flag in cpu_needs if not tier.has(flag)]
    if missing:
        _STATUS[name] = f"not on tier {tier.name} (needs {', '.join(missing)})"
        logger.info("%s: tier %s lacks %s; using torch's operators", name, tier.name, ", ".join(missing))
        return None
    compiler = _compiler()
    if compiler is None:
        _STATUS[name] = "no C compiler"
        logger.info("%s: no C compiler found; using torch's operators", name)
        return None
    try:
        library = ctypes.CDLL(str(_build(KERNELS / f"{name}.c", [*tier.compile_flags, *flags], compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", b"") or b"")[:500]
        _STATUS[name] = "build failed"
        logger.warning("%s: could not build (%s %r); using torch's operators", name, e, detail)
        return None
    _STATUS[name] = tier.name
    return library


def c_function(
    library: ctypes.CDLL, name: str, result: type[Any] | None, *arguments: type[Any]
) -> Callable[..., Any]:
    """`library`'s function `name` with its C result and argument types set (ctypes converts
    Python ints and floats accordingly and checks the argument count)."""
    function = getattr(library, name)
    function.restype = result
    function.argtypes = list(arguments)
    return function  # type: ignore[no-any-return]
