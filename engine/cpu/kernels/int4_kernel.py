"""The 4-bit weight kernel (engine/cpu/kernels/int4_matvec.c, one source for every CPU tier):
build, load, call.

torch's own CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, also what torchao's CPU int4 layout
calls) turns every weight into a float and multiplies in float: compute-bound, and on AVX2 far
from the memory's speed. This kernel keeps weights as bytes, quantizes the activations to 8 bits
per group (as llama.cpp's 4-bit kernels do) and multiplies bytes (quant_dot.h: VPDPBUSD on
AVX-512 VNNI, VPMADDUBSW + VPMADDWD on AVX-512BW and AVX2, SDOT on NEON with dotprod).

Why it is kept: one 6144x2048 projection, batch 1, 2 threads, 24 matrices cycled, interleaved
best of 15 rounds on the 2-core Zen5 (load average 2), ms per call (GB/s of weights as held),
ours against torch's: avx512_bf16 0.186 (38.1) vs 0.194 (34.5); avx512 forced 0.253 (28.0) vs
0.372 (18.0); avx2 forced (ATen forced to AVX2 too) 0.198 (35.7) vs 0.705 (9.5). Where there is
no byte dot product (x86 without AVX2, ARM without dotprod) or no compiler, `load_kernel()`
returns None and engine.cpu.quant keeps torch's kernel.

A prompt's rows go through it too, 8 rows per weight load with AVX-512 and 4 elsewhere
(int4_rows): one 2048->6144 projection over 330 rows, 2 threads, ms, against expanding the
weights for torch's product: avx512_bf16 5.9 vs 13.6 (oneDNN bf16 on unquantized weights:
10.1); avx2 forced 19.7 vs 51.6 (MKL float32: 47.2; one row at a time, as before: 27.7).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from engine.cpu.kernels.int8_kernel import byte_kernel_library
from engine.cpu.native import I32, I64, POINTER, Tier, c_function

BLOCK_ROWS = 16  # output rows per block in the packed layout
CHANNEL_STEP = 8  # input channels per 64-byte chunk


@dataclass(frozen=True)
class PackedInt4:
    """Weights in the kernel's layout (see the C source): `packed` uint8 (N/16, K/8, 64),
    `scales` and `lows` float16 (N/16, K/group, 16)."""

    packed: torch.Tensor
    scales: torch.Tensor
    lows: torch.Tensor
    out_features: int
    in_features: int
    group: int

    def pointers(self) -> tuple[int, int, int]:
        """Addresses of `packed`, `scales` and `lows`, in the C functions' argument order."""
        return self.packed.data_ptr(), self.scales.data_ptr(), self.lows.data_ptr()


def fits(out_features: int, in_features: int, group: int) -> bool:
    return (
        out_features % BLOCK_ROWS == 0
        and group % (2 * CHANNEL_STEP) == 0  # the kernel takes two chunks per step
        and in_features % group == 0
    )


def pack(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group: int) -> PackedInt4:
    """`q` (N, K) integers 0..15, `scale` and `low` (N, K/group): w = q * scale + low, with
    `scale` and `low` rounded to float16 (their relative error 2^-11, against the 4-bit step's
    rounding of up to half a step; llama.cpp keeps its 4-bit scales in float16 too)."""
    n, k = q.shape
    if not fits(n, k, group):
        raise ValueError(f"shape {n}x{k} with group {group} does not fit the int4 kernel")
    nibbles = q.to(torch.uint8).reshape(n // BLOCK_ROWS, BLOCK_ROWS, k // CHANNEL_STEP, 2, 4)
    packed = nibbles[:, :, :, 0, :] | (nibbles[:, :, :, 1, :] << 4)  # (blocks, 16, K/8, 4)
    packed = packed.permute(0, 2, 1, 3).reshape(n // BLOCK_ROWS, k // CHANNEL_STEP, 64)

    def per_block(values: torch.Tensor) -> torch.Tensor:
        blocks = values.float().reshape(n // BLOCK_ROWS, BLOCK_ROWS, k // group)
        return blocks.permute(0, 2, 1).to(torch.float16).contiguous()

    return PackedInt4(packed.contiguous(), per_block(scale), per_block(low), n, k, group)


class Int4Kernel:
    """The loaded library's two functions, typed."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._matmul = c_function(
            library, "vlbot_int4_matmul", I32, POINTER, I32, I64, I64, I64, I64,
            POINTER, POINTER, POINTER, POINTER, I32, I32,
        )  # fmt: skip
        self.isa = c_function(library, "vlbot_int4_isa", ctypes.c_char_p)().decode()

    @property
    def function(self) -> object:
        """The C product itself (engine.cpu.kernels.decode_layer calls it by address)."""
        return self._matmul

    def matmul(self, x: torch.Tensor, weights: PackedInt4) -> torch.Tensor:
        """x (rows, K) -> (rows, N), bfloat16 for bfloat16 input, else float32."""
        return self.matmul_at(x, weights.pointers(), weights.out_features, weights.in_features, weights.group)

    def matmul_at(
        self, x: torch.Tensor, pointers: tuple[int, int, int], n_out: int, k_in: int, group: int
    ) -> torch.Tensor:
        """`matmul` given the weights' addresses (`PackedInt4.pointers()`) and shape: a decode
        step calls it ~200 times, and building the PackedInt4 each time cost ~2 us of ~11."""
        bf16 = x.dtype == torch.bfloat16
        flat = x.contiguous() if bf16 else x.to(torch.float32).contiguous()
        rows, k = flat.shape
        if k != k_in:
            raise ValueError(f"input has {k} features, the weights {k_in}")
        out = torch.empty((rows, n_out), dtype=flat.dtype)
        status = self._matmul(
            flat.data_ptr(), int(bf16), rows, k, n_out, group, *pointers, out.data_ptr(), int(bf16),
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the int4 kernel could not allocate its scratch memory")
        return out


@functools.lru_cache(maxsize=1)
def load_kernel() -> Int4Kernel | None:
    """The kernel, or None where this machine cannot build or run it (reason logged once)."""
    library = byte_kernel_library("int4_matvec")
    return None if library is None else Int4Kernel(library)


def kernel_for(tier: Tier) -> Int4Kernel | None:
    """The kernel built for `tier` (tests and measurements of a lower tier than the process's)."""
    library = byte_kernel_library("int4_matvec", tier)
    return None if library is None else Int4Kernel(library)
