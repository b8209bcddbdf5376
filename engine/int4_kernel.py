"""The AVX-512 VNNI kernel for 4-bit weights (engine/kernels/int4_vnni.c): build, load, call.

torch's own CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) turns every weight into a float and
multiplies in float; on this 2-core machine it is compute-bound at ~22 G multiply-adds/s, 75-79 ms
of a decode step's ~100 ms. The VNNI kernel keeps weights as bytes, quantizes the activations to
8 bits per group (as llama.cpp's 4-bit kernels do) and lets one instruction do 64 multiply-adds,
so a decode step reads the weights at close to memory speed.

The C source is compiled on first use with the system C compiler into a cache directory
(`$XDG_CACHE_HOME/vlbot/kernels`, else `~/.cache/vlbot/kernels`), keyed by the source's hash, and
loaded with ctypes (which releases the GIL for the call). Where the CPU lacks AVX-512 VNNI, no
compiler is found or the build fails, `load_kernel()` returns None and the caller keeps torch's
kernel. `VLBOT_INT4_KERNEL=torch` forces that.
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
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("vlbot.engine")

SOURCE = Path(__file__).with_name("kernels") / "int4_vnni.c"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
COMPILE_FLAGS: tuple[str, ...] = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mfma")
COMPILE_FLAGS += ("-fopenmp", "-shared", "-fPIC")
BLOCK_ROWS = 16  # output rows per block in the packed layout
CHANNEL_STEP = 8  # input channels per 64-byte chunk


@dataclass(frozen=True)
class PackedInt4:
    """Weights in the kernel's layout (see the C source): `packed` uint8 (N/16, K/8, 64),
    `scales` and `lows` float32 (N/16, K/group, 16)."""

    packed: torch.Tensor
    scales: torch.Tensor
    lows: torch.Tensor
    out_features: int
    in_features: int
    group: int


def fits(out_features: int, in_features: int, group: int) -> bool:
    return (
        out_features % BLOCK_ROWS == 0
        and group % (2 * CHANNEL_STEP) == 0  # the kernel takes two chunks per step
        and in_features % group == 0
    )


def pack(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group: int) -> PackedInt4:
    """`q` (N, K) integers 0..15, `scale` and `low` (N, K/group): w = q * scale + low."""
    n, k = q.shape
    if not fits(n, k, group):
        raise ValueError(f"shape {n}x{k} with group {group} does not fit the int4 kernel")
    nibbles = q.to(torch.uint8).reshape(n // BLOCK_ROWS, BLOCK_ROWS, k // CHANNEL_STEP, 2, 4)
    packed = nibbles[:, :, :, 0, :] | (nibbles[:, :, :, 1, :] << 4)  # (blocks, 16, K/8, 4)
    packed = packed.permute(0, 2, 1, 3).reshape(n // BLOCK_ROWS, k // CHANNEL_STEP, 64)

    def per_block(values: torch.Tensor) -> torch.Tensor:
        blocks = values.float().reshape(n // BLOCK_ROWS, BLOCK_ROWS, k // group)
        return blocks.permute(0, 2, 1).contiguous()

    return PackedInt4(packed.contiguous(), per_block(scale), per_block(low), n, k, group)


def _cpu_supports() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    flags = lines[0].split(":", 1)[1].split() if lines else []
    return all(flag in flags for flag in CPU_FLAGS)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlbot" / "kernels"


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"int4_vnni-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler, *COMPILE_FLAGS, "-o", str(built), str(SOURCE)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(built, target)  # atomic: a concurrent build yields the same file
    return target


class Int4Kernel:
    """The loaded library's two functions, typed."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._matmul = library.vlbot_int4_matmul
        self._matmul.restype = i32
        self._matmul.argtypes = [pointer, i32, i64, i64, i64, i64, pointer, pointer, pointer]
        self._matmul.argtypes += [pointer, i32, i32]
        self._dequantize = library.vlbot_int4_dequantize
        self._dequantize.restype = None
        self._dequantize.argtypes = [i64, i64, i64, pointer, pointer, pointer, pointer, i32, i32]

    def matmul(self, x: torch.Tensor, weights: PackedInt4) -> torch.Tensor:
        """x (rows, K) -> (rows, N), bfloat16 for bfloat16 input, else float32."""
        bf16 = x.dtype == torch.bfloat16
        flat = x.contiguous() if bf16 else x.to(torch.float32).contiguous()
        rows, k = flat.shape
        if k != weights.in_features:
            raise ValueError(f"input has {k} features, the weights {weights.in_features}")
        out = torch.empty((rows, weights.out_features), dtype=flat.dtype)
        status = self._matmul(
            flat.data_ptr(),
            int(bf16),
            rows,
            k,
            weights.out_features,
            weights.group,
            weights.packed.data_ptr(),
            weights.scales.data_ptr(),
            weights.lows.data_ptr(),
            out.data_ptr(),
            int(bf16),
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("the int4 kernel could not allocate its scratch memory")
        return out

    def dequantize(self, weights: PackedInt4, dtype: torch.dtype) -> torch.Tensor:
        """The (N, K) weights as float32 or bfloat16."""
        if dtype not in (torch.float32, torch.bfloat16):
            dtype = torch.float32
        out = torch.empty((weights.out_features, weights.in_features), dtype=dtype)
        self._dequantize(
            weights.in_features,
            weights.out_features,
            weights.group,
            weights.packed.data_ptr(),
            weights.scales.data_ptr(),
            weights.lows.data_ptr(),
            out.data_ptr(),
            int(dtype == torch.bfloat16),
            torch.get_num_threads(),
        )
        return out


@functools.lru_cache(maxsize=1)
def load_kernel() -> Int4Kernel | None:
    """The kernel, or None where this machine cannot build or run it (reason logged once)."""
    if os.environ.get("VLBOT_INT4_KERNEL", "").strip().lower() == "torch":
        return None
    if not _cpu_supports():
        logger.info("int4: this CPU lacks AVX-512 VNNI; using torch's int4 kernel")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("int4: no C compiler found; using torch's int4 kernel")
        return None
    try:
        return Int4Kernel(ctypes.CDLL(str(_build(compiler))))
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", b"") or b""
        logger.warning("int4: could not build the VNNI kernel (%s %s); using torch's", e, detail[:500])
        return None
