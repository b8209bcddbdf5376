"""The language model's output head, screened through an 8-bit copy where its weights are bfloat16.

Qwen3-VL-2B's output head is 151,936 rows of 2,048 bfloat16 weights (622 MB, tied to the token
embedding): a sixth of what a decode step reads from memory. A greedy step needs only each row's
largest logit, a sampled one only the `top_k` largest (the model's generation config sets it). With
an 8-bit copy of the head (engine/cpu/kernels/int8_screen.c, half the bytes) every logit gets an
interval that provably holds the value the bfloat16 head computes; the rows whose interval reaches
the top are then computed exactly with the bf16 kernel (the same C loop, hence the same bits), and
every other logit is set to -inf. The argmax (and the top-k) is therefore the bf16 head's — ties
included — and nothing about the answers changes; the step reads 311 MB instead of 622 MB.

The copy is built in the engine's idle time after loading (`prepare`, in slices a request can
interrupt); until then, and for requests that need every logit (sampling without top-k), the full
head runs. Once the copy exists the bf16 head is only read a few rows at a time (candidates,
token embeddings), so its file-mapped pages are released and it stays in the safetensors mapping
rather than moving onto huge pages: resident memory is the copy's 311 MB, not 622 MB.

The activations are bfloat16 (a bf16 model on a tier with bf16 arithmetic) or float32 (the same
weights computing in float32 on AVX2 and AVX-512 without BF16, engine/cpu/half_weights.py); the
screen runs on every x86 tier from AVX2 up. On an AMD EPYC Zen3 (AVX2 only, 2 cores, ~22 GB/s),
the full-size model in the engine, the screened and the full head alternating step by step in one
process: one chat's head 17.6-19.0 ms against 31.0-32.9 ms (medians of three runs of ~29 steps
each), four chats' 38.8-40.3 ms against 47.3-48.4 ms (at four rows the AVX2 dot products, not the
reading, set the pace).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engine.cpu.hugepages import HugePageArena, huge_pages_available, release_file_pages
from engine.cpu.kernels.bf16_kernel import Bf16Kernel
from engine.cpu.kernels.bf16_kernel import load_kernel as load_bf16_kernel
from engine.cpu.native import I32, I64, POINTER, c_function, load_library

logger = logging.getLogger("vlbot.engine")

CPU_FLAGS = ("avx2",)  # VNNI's vpdpbusd where the tier has it, vpmaddubsw otherwise
COMPILE_FLAGS: tuple[str, ...] = ()  # the tier gives the -m flags (engine.cpu.tiers)
MAX_ROWS = 8  # activation rows per reading of the copy (as in the C source)
MAX_TOP = 64  # the largest top-k screened; larger ones use the full head
CANDIDATES = 1024  # more candidates than this in a row: the full head is as cheap
BUILD_ROWS = 16384  # head rows quantized between checks for a waiting request
CHANNEL_STEP = 64  # the copy's rows are padded to a multiple of this


class ScreenLibrary:
    """The loaded C functions, typed."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.build = c_function(
            library,
            "vlbot_int8_screen_build",
            I32,
            POINTER, I64, I64, I64, POINTER, POINTER, POINTER, POINTER, POINTER, I32,
        )  # fmt: skip
        self.screen = c_function(
            library,
            "vlbot_int8_screen",
            I32,
            POINTER, I32, I64, I64, I64, I64, POINTER, POINTER, POINTER, POINTER, POINTER,
            I64, I64, POINTER, POINTER, POINTER, I32,
        )  # fmt: skip


@functools.lru_cache(maxsize=1)
def load_screen() -> ScreenLibrary | None:
    library = load_library("int8_screen", COMPILE_FLAGS, CPU_FLAGS)
    return None if library is None else ScreenLibrary(library)


class Int8Copy:
    """The head's 8-bit copy: `q` (N, Kp) int8 and per row its scale, s|q|, the residual's norm
    (+ the bf16 sum's rounding) and sum(q). `q` lives on huge pages where the system has them."""

    def __init__(self, rows: int, channels: int) -> None:
        self.rows, self.channels = rows, channels
        self.padded = -(-channels // CHANNEL_STEP) * CHANNEL_STEP
        self.arena: HugePageArena | None = None
        if huge_pages_available():
            self.arena = HugePageArena(rows * self.padded)
            self.q = self.arena.empty((rows, self.padded), torch.int8)
        else:
            self.q = torch.empty((rows, self.padded), dtype=torch.int8)
        self.scale = torch.empty(rows, dtype=torch.float32)
        self.qnorm = torch.empty(rows, dtype=torch.float32)
        self.resid = torch.empty(rows, dtype=torch.float32)
        self.rowsum = torch.empty(rows, dtype=torch.int32)
        self.built = 0  # rows quantized so far

    @property
    def complete(self) -> bool:
        return self.built == self.rows

    def parts(self) -> tuple[torch.Tensor, ...]:
        """q, scale, qnorm, resid and rowsum, in the C functions' argument order."""
        return (self.q, self.scale, self.qnorm, self.resid, self.rowsum)


class OutputHead:
    """`head(hidden (B, H), top)`: the output head's logits (B, V). With `top` (1 for greedy
    rows, a sampler's k) only logits that can be among each row's `top` largest are guaranteed;
    the others may be -inf. `top=None`: every logit."""

    def __init__(self, linear: nn.Module, screen: ScreenLibrary | None, kernel: Bf16Kernel | None):
        self.linear = linear
        self._screen = screen
        self._kernel = kernel
        self.copy: Int8Copy | None = None
        self._bounds: torch.Tensor | None = None
        self.screened_steps = 0  # calls answered by the screen (the rest: the full head)

    @classmethod
    def for_model(cls, model: Any) -> OutputHead:
        """The head of `model`; it screens where the head is a bfloat16 linear layer without bias
        and the C kernels are available here."""
        linear = model.lm_head
        weight = getattr(linear, "weight", None)
        usable = (
            isinstance(weight, torch.Tensor)
            and weight.dtype == torch.bfloat16
            and weight.dim() == 2
            and weight.is_contiguous()
            and getattr(linear, "bias", None) is None
        )
        if not usable:
            return cls(linear, None, None)
        screen, kernel = load_screen(), load_bf16_kernel()
        if screen is None or kernel is None:
            return cls(linear, None, None)
        return cls(linear, screen, kernel)

    @property
    def weight(self) -> torch.Tensor:
        weight = self.linear.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @property
    def screens(self) -> bool:
        """True once the copy is built (after `prepare` reported done)."""
        return self.copy is not None and self.copy.complete

    def kept_in_file(self) -> list[torch.Tensor]:
        """Tensors that should stay in their file mapping (not move onto huge pages)."""
        return [self.weight] if self.screens else []

    def prepare(self, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Build the 8-bit copy, a slice at a time while `should_stop()` is False. Returns True
        once there is nothing left to do (at once where the head is not screened)."""
        if self._screen is None or self.screens:
            return True
        weight = self.weight.detach()
        rows, channels = weight.shape
        if self.copy is None:
            self.copy = Int8Copy(rows, channels)
            self._bounds = torch.empty(2 * MAX_ROWS * rows, dtype=torch.float32)
        copy = self.copy
        with torch.no_grad():
            while not copy.complete:
                if should_stop():
                    return False
                start, end = copy.built, min(copy.built + BUILD_ROWS, rows)
                self._screen.build(
                    weight[start].data_ptr(),
                    end - start,
                    channels,
                    copy.padded,
                    *(part[start:].data_ptr() for part in copy.parts()),
                    torch.get_num_threads(),
                )
                copy.built = end
        # from now on the bf16 rows are read a few at a time: their pages need not stay resident
        release_file_pages([weight])
        logger.info("output head: 8-bit screening copy of %d x %d built", rows, channels)
        return True

    def __call__(self, hidden: torch.Tensor, top: int | None) -> torch.Tensor:
        screenable = hidden.dtype in (torch.bfloat16, torch.float32)  # float32: half-size weights
        if top is not None and self.screens and screenable and 1 <= top <= MAX_TOP:
            logits = self._screened(hidden.reshape(-1, hidden.shape[-1]).contiguous(), top)
            if logits is not None:
                self.screened_steps += 1
                return logits.reshape(*hidden.shape[:-1], -1)
        full: torch.Tensor = self.linear(hidden)
        return full

    def _screened(self, hidden: torch.Tensor, top: int) -> torch.Tensor | None:
        copy, screen, kernel, bounds = self.copy, self._screen, self._kernel, self._bounds
        assert copy is not None and screen is not None and kernel is not None and bounds is not None
        rows = hidden.shape[0]
        found = torch.empty((rows, CANDIDATES), dtype=torch.int64)
        counts = torch.empty(rows, dtype=torch.int64)
        status = screen.screen(
            hidden.data_ptr(),
            int(hidden.dtype == torch.float32),
            rows,
            copy.channels,
            copy.padded,
            copy.rows,
            *(part.data_ptr() for part in copy.parts()),
            top,
            CANDIDATES,
            found.data_ptr(),
            counts.data_ptr(),
            bounds.data_ptr(),
            torch.get_num_threads(),
        )
        if status == -1:
            raise MemoryError("the output head's screen could not allocate its scratch memory")
        if status != 0 or int(counts.max()) > CANDIDATES:
            return None  # not finite, or too many close calls: the full head
        # every row's candidates, ascending (their exact logits are the same for all rows)
        picked = torch.cat([found[m, : int(counts[m])] for m in range(rows)])
        if rows > 1:
            picked = torch.sort(picked).values
            picked = picked[torch.cat([picked[:1] >= 0, picked[1:] != picked[:-1]])]
        logits = torch.full((rows, copy.rows), float("-inf"), dtype=hidden.dtype)
        logits[:, picked] = self._exact(hidden, picked, kernel)
        return logits

    def _exact(self, hidden: torch.Tensor, picked: torch.Tensor, kernel: Bf16Kernel) -> torch.Tensor:
        """The bf16 kernel's logits for rows `picked` of the head, bit for bit what it gives
        over the whole head: it sums each weight row on its own, the same way wherever the row
        sits."""
        gathered = self.weight.detach()[picked].contiguous()
        logits: torch.Tensor = kernel.matmul(hidden, gathered, None)
        return logits
