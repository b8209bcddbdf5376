"""Build and load vlbot's small C kernels (engine/cpu/kernels/*.c) at run time.

Each kernel is one C file (plus the shared headers beside it) compiled with the system C
compiler (`$CC`, else `cc`, else `gcc`) on first use into a cache directory
(`$XDG_CACHE_HOME/vlbot/kernels`, else `~/.cache/vlbot/kernels`), named by the hash of its
source, the headers and the flags, and loaded with ctypes (which releases the GIL during a call).
The libraries use OpenMP; the `libgomp.so.1` torch has already loaded satisfies them, so the
kernels share torch's thread pool.

A kernel is offered only where the CPU has the instructions it was compiled for. Where it is not
(another CPU, no compiler, a failed build), callers keep torch's own operators; the reason is
logged once. `VLBOT_NATIVE_KERNELS=off` turns every kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("vlbot.engine")

KERNELS = Path(__file__).with_name("kernels")
# the C argument types the kernels' functions take
POINTER, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    return frozenset(lines[0].split(":", 1)[1].split() if lines else ())


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


def load_library(name: str, flags: Sequence[str], cpu_needs: Sequence[str]) -> ctypes.CDLL | None:
    """engine/cpu/kernels/`name`.c built with `flags`, or None (reason logged) where the kernels are
    turned off, the CPU lacks one of `cpu_needs`, or no compiler can build it."""
    if os.environ.get("VLBOT_NATIVE_KERNELS", "").strip().lower() in ("off", "0", "false", "no"):
        return None
    missing = [flag for flag in cpu_needs if flag not in cpu_flags()]
    if missing:
        logger.info("%s: this CPU lacks %s; using torch's operators", name, ", ".join(missing))
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("%s: no C compiler found; using torch's operators", name)
        return None
    try:
        return ctypes.CDLL(str(_build(KERNELS / f"{name}.c", flags, compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", b"") or b"")[:500]
        logger.warning("%s: could not build (%s %r); using torch's operators", name, e, detail)
        return None


def c_function(
    library: ctypes.CDLL, name: str, result: type[Any] | None, *arguments: type[Any]
) -> Callable[..., Any]:
    """`library`'s function `name` with its C result and argument types set (ctypes converts
    Python ints and floats accordingly and checks the argument count)."""
    function = getattr(library, name)
    function.restype = result
    function.argtypes = list(arguments)
    return function  # type: ignore[no-any-return]
