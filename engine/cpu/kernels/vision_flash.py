"""Qwen3-VL's vision attention on AMX tiles (engine/cpu/kernels/vision_flash.c), for bfloat16 models.

The vision tower attends over all of an image's patches in every layer: 16 heads x 4,032^2 scores
for a 1080p screenshot. torch's CPU flash attention spends 90-110 ms per layer on that here (2.6 s
of the screenshot's ~7 s first token); the kernel computes the same attention with AMX tile
products and a vectorized softmax in 42-46 ms (alternating runs on the same VM). Its arithmetic is
torch's flash attention's (bfloat16 products with float sums, float softmax, probabilities rounded
to bfloat16 for the second product), but the blocks and the exponential differ, so results are not
bit for bit torch's: the tests hold its error against exact float attention to torch's own.

Offered where the CPU has AMX (and the OS grants it) and the heads have 64 channels (as
Qwen3-VL-2B's: 16 heads of 64); elsewhere `VisionAttention` keeps torch's attention.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable, Sequence

import torch

from engine.cpu.native import F32, I32, I64, POINTER, c_function, load_library

logger = logging.getLogger("vlbot.engine")

CPU_FLAGS = ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16")
COMPILE_FLAGS: tuple[str, ...] = ()  # the amx tier gives the -m flags (engine.cpu.tiers)
HEAD_DIM = 64  # the kernel's tiles are laid out for 64-channel heads


class FlashKernel:
    """The loaded library's attention, with the scratch memory it packs keys and values into
    (kept between calls: a 1080p screenshot needs 16 MB; calls take turns)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._attend = c_function(
            library, "vlbot_vision_flash", I32, POINTER, POINTER, POINTER, I64, I64, I64, F32,
            POINTER, I64, POINTER, I32,
        )  # fmt: skip
        self._scratch_bytes = c_function(library, "vlbot_vision_flash_scratch", I64, I64, I64)
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._lock = threading.Lock()

    @staticmethod
    def supports(q: torch.Tensor) -> bool:
        return q.dtype == torch.bfloat16 and q.dim() == 3 and q.shape[-1] == HEAD_DIM

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        windows: Sequence[tuple[int, int]],
        scale: float,
    ) -> torch.Tensor | None:
        """Attention of q, k, v (heads, seq, 64) bfloat16 within each (start, length) window of
        the sequence -> (seq, heads x 64), what the output projection reads; None where the
        kernel could not get its working memory (the caller then uses torch's)."""
        if not self.supports(q) or q.shape != k.shape or q.shape != v.shape:
            raise ValueError("expected bfloat16 (heads, seq, 64) queries, keys and values alike")

        def attend(at: WindowAddresses, heads: int, length: int, head_stride: int, out_stride: int) -> bool:
            needed = int(self._scratch_bytes(heads, length))
            if self._scratch.numel() < needed:
                self._scratch = torch.empty(needed, dtype=torch.uint8)
            scratch, threads = self._scratch.data_ptr(), torch.get_num_threads()
            q_at, k_at, v_at, out_at = at
            status = self._attend(
                q_at, k_at, v_at, heads, length, head_stride, scale, out_at, out_stride, scratch, threads
            )
            return bool(status)

        with self._lock:
            return per_window(q, k, v, windows, attend)


WindowAddresses = tuple[int, int, int, int]  # a window's q, k, v and output addresses


def per_window(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: Sequence[tuple[int, int]],
    attend: Callable[[WindowAddresses, int, int, int, int], bool],
) -> torch.Tensor | None:
    """(seq, heads x dim) from `attend(addresses, heads, length, head_stride, out_stride)` called
    for each (start, length) window of q, k, v (heads, seq, dim) with the window's addresses;
    None as soon as one call returns True (failed)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    heads, seq, dim = q.shape
    out = q.new_empty((seq, heads * dim))
    size = q.element_size()
    for start, length in windows:
        if length <= 0:
            continue
        offset = start * dim * size
        at = (q.data_ptr() + offset, k.data_ptr() + offset, v.data_ptr() + offset,
              out.data_ptr() + start * heads * dim * size)  # fmt: skip
        if attend(at, heads, length, seq * dim, heads * dim):
            return None
    return out


@functools.lru_cache(maxsize=1)
def load_kernel() -> FlashKernel | None:
    library = load_library("vision_flash", COMPILE_FLAGS, CPU_FLAGS)
    if library is None:
        return None
    enable = c_function(library, "vlbot_vision_flash_enable", I32)
    if enable() != 0:
        logger.info("vision_flash: the OS did not grant the AMX tiles; using torch's attention")
        return None
    return FlashKernel(library)
