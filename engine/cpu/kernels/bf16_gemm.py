"""A prompt's float32 rows times bfloat16 weights in one C product (engine/cpu/kernels/bf16_gemm.c).

On a tier without bf16 arithmetic the half-size-weights model (engine.cpu.half_weights) keeps its
language model's weights in bf16 and computes in float32. Over a prompt, each product used to
widen its weight 4 M elements at a time into float32 scratch for oneDNN's float32 product
(engine.cpu.kernels.bf16_kernel). This kernel folds the widening into the packing of a blocked
product (BLIS's loops, a 6 x 2-vector register block, simd.h's one source for every tier), so
the weights are read once as bf16 and nothing else is written.

Measured on the real AVX2 CPU vlbot has (AMD EPYC Zen3, 2 cores at 2.45 GHz, no AVX-512),
Qwen3-VL-2B's shapes for a 640x480 photo's 330-row prompt, 2 threads, six different weights per
shape cycled so they come from memory, A/B interleaved, medians (the machine's noise is ~10 %):

| product | widened + oneDNN | this kernel |
|---|---|---|
| 330 x 2048 -> 2048 (q, o) | 28.8 ms | 22.4 ms |
| 330 x 2048 -> 1024 (k, v) | 13.1 ms | 12.4 ms |
| 330 x 2048 -> 6144 (gate, up) | 86.5 ms | 68.6 ms |
| 330 x 6144 -> 2048 (down) | 82.6 ms | 68.9 ms |
| a decoder layer's seven | 339.5 ms | 275.6 ms |

One thread over one hot 330 x 2048 -> 2048 weight it runs at 76.5 GFLOPS, the core's peak
(2 FMA units of 8 floats at ~2.45 GHz: 78 GFLOPS); two threads 147.6. In the engine, photo
prompts alternating between the two in one process (4 each), the first token's part after the
vision tower (the language model's prefill): median 7.94 s against 8.71 s.

The vision tower's linears take it too on that tier (engine.cpu.half_weights: their weights stay
bf16): 1,200 rows, the encoder's four shapes against oneDNN over float32 copies in its own
layout, 277 against 294 ms a layer (qkv 62 vs 75 ms, fc2 101 vs 96); the whole encoder of a
640x480 photo about the same (8.3-8.7 s against 8.3-8.5 s), with 0.78 GB less peak memory.

So it is used where it was measured to win: the AVX2 tier (`WINS_ON`: x86 with 256-bit vectors
at most, which includes AVX2 forced on an AVX-512 machine, the same code). On AVX-512 tiers
without bf16 oneDNN's float32 product has 512-bit vectors and was not measured against this
kernel; on aarch64 speed cannot be measured here. There the widened product stays; the kernel is
built and checked against a scalar reference for every tier and under qemu for aarch64
(tests/native/kernel_check.c).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from engine.cpu.native import I32, I64, POINTER, active_tier, c_function, load_library, note_not_used

CPU_FLAGS = ("avx2", "fma")
# where it beat the widened oneDNN product (above): not on tiers with these
LOSES_OR_UNMEASURED_ON = ("avx512f",)
UNMEASURED = "oneDNN's float32 product is unmeasured against it"


class Bf16Gemm:
    """The loaded library's product, typed."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._gemm = c_function(
            library, "vlbot_bf16_gemm", I32, POINTER, I64, I64, POINTER, I64, POINTER, POINTER, I32
        )

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (rows, K) float32 times weight (N, K) bfloat16, transposed, plus bias (N): float32
        (rows, N)."""
        if x.dtype != torch.float32 or weight.dtype != torch.bfloat16 or x.dim() != 2 or weight.dim() != 2:
            raise ValueError("expected float32 rows (rows, K) and a bfloat16 weight (N, K)")
        rows, k = x.shape
        n = weight.shape[0]
        if weight.shape[1] != k:
            raise ValueError(f"rows of {k} values against a weight of {weight.shape[1]} columns")
        x = x.contiguous()
        weight = weight.contiguous()
        wide_bias = None if bias is None else bias.float().contiguous()
        out = torch.empty((rows, n), dtype=torch.float32)
        status = self._gemm(
            x.data_ptr(), rows, k, weight.data_ptr(), n,
            None if wide_bias is None else wide_bias.data_ptr(), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the bf16 product could not allocate its working memory")
        return out


def build_kernel() -> Bf16Gemm | None:
    """The kernel built for the active tier wherever it builds (x86 with AVX2, aarch64), for
    tests; `load_kernel` is what the engine uses."""
    library = load_library("bf16_gemm", (), ("asimd",) if active_tier().is_arm else CPU_FLAGS)
    return None if library is None else Bf16Gemm(library)


def load_kernel() -> Bf16Gemm | None:
    """The kernel where it beat the widened product (the AVX2 tier), else None; built once per
    tier (tests force several in one process)."""
    return _kernel_for(active_tier().name)


@functools.cache
def _kernel_for(tier_name: str) -> Bf16Gemm | None:  # the active tier's name: one entry per tier
    tier = active_tier()
    if tier.is_arm or tier.has(*LOSES_OR_UNMEASURED_ON):
        why = "speed not measurable here" if tier.is_arm else UNMEASURED
        note_not_used("bf16_gemm", f"not used on tier {tier.name}: {why}")
        return None
    return build_kernel()
