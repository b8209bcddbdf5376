"""Qwen3-VL's vision attention in float arithmetic on any tier (engine/cpu/kernels/vision_flash_portable.c).

The vision tower attends over all of an image's patches in every layer (16 heads of 64 channels;
1,200 patches for a 640x480 photo, 4,032 for a 1080p screenshot). torch's CPU flash attention runs
at ~175 GFLOPS on the 2-core Zen5 vlbot is measured on, whatever the tier (its products are MKL's
AVX2 code on AMD). This kernel (flash attention with register-blocked vector multiply-adds, one
source through simd.h; bf16 inputs on a CPU with AVX-512-BF16 multiply bf16 pairs with
`vdpbf16ps`) against it, 16 heads, 2 threads, best of three:

| tier | 1,200 patches | 4,032 patches |
|---|---|---|
| avx512_bf16, bf16 inputs (the bf16 model) | 13.7 vs 37.4 ms | 145 vs 402 ms |
| avx512_bf16, float32 | 20.0 vs 33.5 ms | 214 vs 365 ms |
| avx512 forced, float32 (the half-size-weights model) | 20.6 vs 33.8 ms | 215 vs 364 ms |
| avx2 forced, float32 | 32.9 vs 33.1 ms | 366 vs 373 ms |

So it is offered only on AVX-512 tiers (`load_kernel`: over 24 layers natively ~0.5 s less of a
640x480 photo's first token and ~6 s less of a 1080p screenshot's); with AVX2 it only draws level
and torch's attention stays, and on aarch64, where its speed cannot be measured here, too. Where the
CPU has AMX, engine/cpu/kernels/vision_flash.py's tile kernel comes first. Its probabilities stay
float (torch's bf16 attention rounds them to bf16): the tests hold its error against exact
attention to torch's own, on every tier this machine runs and under qemu for aarch64
(`build_kernel` builds it for any tier, for those tests).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import torch

from engine.cpu.kernels.vision_flash import WindowAddresses, per_window
from engine.cpu.native import F32, I32, I64, POINTER, active_tier, c_function, load_library

HEAD_DIM = 64  # the kernel's register blocks are laid out for 64-channel heads
WINS_ON = ("avx512f",)  # the tiers where it beat torch's attention (the table above)
DTYPES = (torch.float32, torch.bfloat16)


class PortableFlash:
    """The loaded library's attention (it allocates its own working memory: a 1080p
    screenshot's 16 heads of keys and values as floats, 33 MB, for the call)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._attend = c_function(
            library, "vlbot_vision_attention", I32, POINTER, POINTER, POINTER, I64, I64, I64, F32,
            POINTER, I64, I32, I32,
        )  # fmt: skip

    @staticmethod
    def supports(q: torch.Tensor) -> bool:
        return q.dtype in DTYPES and q.dim() == 3 and q.shape[-1] == HEAD_DIM

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        windows: Sequence[tuple[int, int]],
        scale: float,
    ) -> torch.Tensor | None:
        """Attention of q, k, v (heads, seq, 64), float32 or bfloat16, within each (start,
        length) window of the sequence -> (seq, heads x 64) of their dtype, what the output
        projection reads; None where the kernel could not get its working memory (the caller
        then uses torch's)."""
        if not self.supports(q) or q.shape != k.shape or q.shape != v.shape:
            raise ValueError("expected float32 or bfloat16 (heads, seq, 64) queries, keys and values alike")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise ValueError("queries, keys and values must share their dtype")
        bf16 = int(q.dtype == torch.bfloat16)

        def attend(at: WindowAddresses, heads: int, length: int, head_stride: int, out_stride: int) -> bool:
            threads = torch.get_num_threads()
            q_at, k_at, v_at, out_at = at
            status = self._attend(
                q_at, k_at, v_at, heads, length, head_stride, scale, out_at, out_stride, bf16, threads
            )
            return bool(status)

        return per_window(q, k, v, windows, attend)


def build_kernel() -> PortableFlash | None:
    """The kernel built for the active tier, wherever it builds (x86 with AVX2, aarch64)."""
    needs = ("asimd",) if active_tier().is_arm else ("avx2", "fma")
    library = load_library("vision_flash_portable", (), needs)
    return None if library is None else PortableFlash(library)


@functools.lru_cache(maxsize=1)
def load_kernel() -> PortableFlash | None:
    """The kernel where it beats torch's attention (AVX-512 tiers), else None."""
    library = load_library("vision_flash_portable", (), WINS_ON)
    return None if library is None else PortableFlash(library)
