"""The 8-bit weight kernel (engine/cpu/kernels/int8_matvec.c, one source for every CPU tier):
build, load, call.

torch's `_weight_int8pack_mm` converts every weight to a float and multiplies in float: on the
2-core Zen5 it is compute-bound (the engine's int8 decode was 10.1 tok/s against 9.6 in bf16),
and torchao's `Int8WeightOnlyConfig` in eager mode is slower still (it expands the weights each
call: 15.5 ms for the projection below at load average 6, where ours took ~1.4 ms). This
kernel multiplies bytes by bytes (activations quantized to 8 bits per group of 128, as
llama.cpp's Q8_0 does per 32; quant_dot.h: VPDPBUSD on AVX-512 VNNI, VPMADDUBSW + VPMADDWD on
AVX-512BW and AVX2, SDOT on NEON with dotprod).

Why it is kept: one 6144x2048 projection, batch 1, 2 threads, 24 matrices cycled, interleaved
best of 15 rounds on the 2-core Zen5 (load average 2), ms per call (GB/s of weights as held),
ours against `_weight_int8pack_mm`: avx512_bf16 0.316 (39.8) vs 0.447 (28.2); avx512 forced
0.428 (29.5) vs 0.612 (20.6); avx2 forced (ATen forced to AVX2 too) 0.325 (38.8) vs 0.590
(21.3). Where there is no byte dot product or no compiler, `load_kernel()` returns None and
engine.cpu.quant keeps torch's kernel.

A prompt's rows go through it too, 4 rows per weight load on AVX2 and NEON; on AVX-512 5 rows
against two blocks of 16 outputs, each activation load serving both (quant_dot.h's PROMPT_BLOCKS:
a 330-row layer's seven products 40.8 -> 32.6 ms natively, 65.7 -> 59.9 forced, against 8 rows
and one block). Before that, 8 rows per weight load (int8_rows): one 2048->6144 projection
over 330 rows, 2 threads, ms, against expanding the weights for torch's product: avx512_bf16
7.9 vs 13.9 (oneDNN bf16 on unquantized weights: 10.1; oneDNN's int8 `_int_mm` with per-row
activation scales, which would need another copy of the weights: 5.0); avx2 forced 25.1 vs
51.8 (MKL float32: 47.2; `_int_mm`: 17.5; one row at a time, as before: 30.8).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from engine.cpu.native import I32, I64, POINTER, Tier, active_tier, c_function, load_library

BLOCK_ROWS = 16  # output rows per block in the packed layout
CHANNEL_STEP = 4  # input channels per 64-byte chunk
QUANTIZE_ROWS = 4096  # weight rows quantized at a time
ACTIVATION_GROUPS = (128, 64, 32)  # activation channels per 8-bit scale, the first that divides K


@dataclass(frozen=True)
class PackedInt8:
    """Weights in the kernel's layout (see the C source): `packed` int8 (N/16, K/4, 64) and
    `scales` float32 (N,): w[n][k] = q * scales[n]."""

    packed: torch.Tensor
    scales: torch.Tensor
    out_features: int
    in_features: int

    @property
    def group(self) -> int:
        return next(g for g in ACTIVATION_GROUPS if self.in_features % g == 0)


def fits(out_features: int, in_features: int) -> bool:
    return out_features % BLOCK_ROWS == 0 and any(in_features % g == 0 for g in ACTIVATION_GROUPS)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K) in -127..127, scale float32 (N,)): symmetric, per output row; computed
    QUANTIZE_ROWS rows at a time (the float temporaries of Qwen3-VL-2B's whole output head were
    ~4 GB at the first start)."""
    n, k = weight.shape
    q = torch.empty((n, k), dtype=torch.int8)
    scale = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, QUANTIZE_ROWS):
        stop = min(n, start + QUANTIZE_ROWS)
        w = weight[start:stop].detach().float()
        part = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        q[start:stop] = torch.round(w / part[:, None]).clamp(-127, 127)
        scale[start:stop] = part
    return q, scale


def pack(q: torch.Tensor, scale: torch.Tensor) -> PackedInt8:
    """`q` (N, K) int8 and `scale` (N,) into the kernel's layout."""
    n, k = q.shape
    if not fits(n, k):
        raise ValueError(f"shape {n}x{k} does not fit the int8 kernel")
    blocks = q.reshape(n // BLOCK_ROWS, BLOCK_ROWS, k // CHANNEL_STEP, CHANNEL_STEP)
    packed = blocks.permute(0, 2, 1, 3).reshape(n // BLOCK_ROWS, k // CHANNEL_STEP, 64)
    return PackedInt8(packed.contiguous(), scale.float().contiguous(), n, k)


class Int8Kernel:
    """The loaded library's functions, typed."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._matmul = c_function(
            library, "vlbot_int8_matmul", I32, POINTER, I32, I64, I64, I64, I64,
            POINTER, POINTER, POINTER, I32, I32,
        )  # fmt: skip
        self.isa = c_function(library, "vlbot_int8_isa", ctypes.c_char_p)().decode()

    @property
    def function(self) -> object:
        """The C product itself (engine.cpu.kernels.decode_layer calls it by address)."""
        return self._matmul

    def matmul(self, x: torch.Tensor, weights: PackedInt8) -> torch.Tensor:
        """x (rows, K) -> (rows, N), bfloat16 for bfloat16 input, else float32."""
        bf16 = x.dtype == torch.bfloat16
        flat = x.contiguous() if bf16 else x.to(torch.float32).contiguous()
        rows, k = flat.shape
        if k != weights.in_features:
            raise ValueError(f"input has {k} features, the weights {weights.in_features}")
        out = torch.empty((rows, weights.out_features), dtype=flat.dtype)
        status = self._matmul(
            flat.data_ptr(), int(bf16), rows, k, weights.out_features, weights.group,
            weights.packed.data_ptr(), weights.scales.data_ptr(), out.data_ptr(), int(bf16),
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the int8 kernel could not allocate its scratch memory")
        return out


def dot_needs(tier: Tier) -> tuple[str, ...]:
    """The instructions the byte kernels need (quant_dot.h): AVX2's byte products on x86, SDOT
    (dotprod) on aarch64. Below that (x86 without AVX2, ARM without dotprod) plain C would be
    no faster than torch's kernels, which are kept there."""
    return ("asimddp",) if tier.is_arm else ("avx2",)


def byte_kernel_library(name: str, tier: Tier | None = None) -> ctypes.CDLL | None:
    """One of the byte kernels (int8_matvec, int4_matvec) built for `tier` (default: this
    process's), or None where that tier lacks the byte products they need (`dot_needs`)."""
    if tier is None:
        return load_library(name, cpu_needs=dot_needs(active_tier()))
    return load_library(name, cpu_needs=dot_needs(tier), tier=tier)


@functools.lru_cache(maxsize=1)
def load_kernel() -> Int8Kernel | None:
    """The kernel for this process's tier, or None where it cannot be built (reason logged once)."""
    library = byte_kernel_library("int8_matvec")
    return None if library is None else Int8Kernel(library)


def kernel_for(tier: Tier) -> Int8Kernel | None:
    """The kernel built for `tier` (tests and measurements of a lower tier than the process's)."""
    library = byte_kernel_library("int8_matvec", tier)
    return None if library is None else Int8Kernel(library)
