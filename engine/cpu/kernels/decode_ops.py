"""ctypes bindings of engine/cpu/kernels/decode_ops.c: a decode step's RMSNorms and rotary embedding
in one call each (engine.cpu.decode_step uses them where the library builds)."""

from __future__ import annotations

import ctypes
import functools

import torch

from engine.cpu.native import F32, I32, I64, POINTER, c_function, load_library

COMPILE_FLAGS = ("-ffp-contract=off",)  # plain C: any CPU; no fused multiply-adds (same rounding)
DTYPES = (torch.float32, torch.bfloat16)


class DecodeOps:
    """The loaded library's functions, typed. Tensors must be contiguous, float32 or bfloat16."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._norm = c_function(
            library, "vlbot_rms_norm", None, POINTER, POINTER, POINTER, I64, I64, F32, I32
        )
        self._qk = c_function(
            library, "vlbot_qk_norm_rotate", None, POINTER, POINTER, I64, POINTER, POINTER, I64,
            POINTER, POINTER, I64, I64, F32, I32,
        )  # fmt: skip

    @property
    def norm_function(self) -> object:
        """The C functions themselves (engine.cpu.kernels.decode_layer calls them by address)."""
        return self._norm

    @property
    def qk_function(self) -> object:
        return self._qk

    @staticmethod
    def takes(*tensors: torch.Tensor) -> bool:
        dtype = tensors[0].dtype
        return dtype in DTYPES and all(t.dtype == dtype and t.is_contiguous() for t in tensors)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        dim = x.shape[-1]
        bf16 = int(x.dtype == torch.bfloat16)
        self._norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps, bf16)
        return out

    def qk_norm_rotate(
        self,
        q: torch.Tensor,
        q_weight: torch.Tensor,
        k: torch.Tensor,
        k_weight: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        eps: float,
    ) -> None:
        """In place on q (B, 1, Hq, D) and k (B, 1, Hk, D); cos and sin (B, D)."""
        batch, _, q_heads, dim = q.shape
        self._qk(
            q.data_ptr(),
            q_weight.data_ptr(),
            q_heads,
            k.data_ptr(),
            k_weight.data_ptr(),
            k.shape[2],
            cos.data_ptr(),
            sin.data_ptr(),
            batch,
            dim,
            eps,
            int(q.dtype == torch.bfloat16),
        )


@functools.lru_cache(maxsize=1)
def load_ops() -> DecodeOps | None:
    library = load_library("decode_ops", COMPILE_FLAGS, ())
    return None if library is None else DecodeOps(library)
