"""The language model's RMSNorms and MLP gate in one C pass each (engine/cpu/kernels/prefill_ops.c).

A prompt's prefill (a first turn with a 1080p screenshot is ~1,040 tokens) runs each of
transformers' RMSNorms as six whole-tensor operators and each MLP's silu(gate) * up as two more; on
2 cores those element-wise passes were ~0.5 s of the screenshot's first token, next to ~2 s of
matrix products. `use_fast_prefill_ops` swaps the language model's `Qwen3VLTextRMSNorm` modules
(the layer norms, the per-head query and key norms, the final norm) and `Qwen3VLTextMLP` modules
for ones that keep the same parameters and submodules (what engine.cpu.decode_step and the
quantization read) and call the kernel for bfloat16 inputs: same rounding as transformers', with
the last bit now and then different (another summation order; another exponential).

On a tier without bf16 arithmetic the bf16 model computes in float32 (engine.cpu.half_weights), and
the kernels take its float32 inputs too (a few units in the last place from torch's result).
A 330-token prompt's 28 layers (2 norms, q and k norm + rotary, the SiLU gate each) on the
2-core Zen5, medians of 40 alternations: forced AVX-512 190 ms with transformers' float32
operators against 77 ms with the kernels, forced AVX2 215 against 51 ms (bfloat16 natively: the
kernels 35-38 ms, transformers' operators 52-108). A float32 model on a tier with bf16 arithmetic
is a choice of precision: it keeps transformers' arithmetic exactly, as does any other dtype. x86
only (AVX2 and up), where it was measured.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

import torch
from torch import nn

from engine.cpu.native import F32, I32, I64, POINTER, active_tier, c_function, load_library

logger = logging.getLogger("vlbot.engine")

CPU_FLAGS = ("avx2", "fma")  # x86 tiers (simd.h); not offered on aarch64, where it is unmeasured
COMPILE_FLAGS = ("-ffp-contract=off",)  # and the tier's -m flags (engine.cpu.tiers)
DTYPES = (torch.bfloat16, torch.float32)  # what the kernels take
BF16_ONLY = frozenset({torch.bfloat16})  # what the swapped modules give them where the tier has bf16
# Float32 inputs go to the kernels from this many positions per sequence on: one position is a
# decode step run through the modules (transformers' generate; the engine's own steps go through
# engine.cpu.decode_step), which keeps transformers' arithmetic, as the engine's decode steps do
# (kernels/decode_ops.c), so that the two agree token for token.
FLOAT32_MIN_POSITIONS = 2


def positions(x: torch.Tensor) -> int:
    """The new token positions per sequence of a language-model activation: (batch, seq,
    features) or, per head, (batch, seq, heads, dim)."""
    return x.shape[1] if x.dim() >= 3 else x.shape[0]


def served(x: torch.Tensor, dtypes: frozenset[torch.dtype]) -> bool:
    """Whether a swapped module hands `x` to the kernels: its dtype is one of `dtypes`, and a
    float32 one has at least FLOAT32_MIN_POSITIONS positions (a prompt, not a decode step)."""
    return x.dtype in dtypes and (x.dtype != torch.float32 or positions(x) >= FLOAT32_MIN_POSITIONS)
NORM_CLASS, MLP_CLASS, ATTENTION_CLASS = "Qwen3VLTextRMSNorm", "Qwen3VLTextMLP", "Qwen3VLTextAttention"
LANES = 16  # the kernels take rows whose length is a multiple of this


class PrefillOps:
    """The loaded library's functions, typed."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._norm = c_function(
            library, "vlbot_prefill_rms_norm", None, POINTER, POINTER, POINTER, I64, I64, F32, I32, I32
        )
        self._silu_gate = c_function(
            library, "vlbot_prefill_silu_gate", None, POINTER, POINTER, I64, POINTER, I64, I64, I32, I32
        )
        self._norm_rotate = c_function(
            library, "vlbot_prefill_norm_rotate", None, POINTER, POINTER, POINTER, POINTER, POINTER,
            I64, I64, I64, I64, F32, I32, I32,
        )  # fmt: skip

    @staticmethod
    def takes(*tensors: torch.Tensor) -> bool:
        """Whether the kernels take these tensors: contiguous, all bfloat16 or all float32, rows
        of a multiple of LANES."""
        dtype = tensors[0].dtype
        return dtype in DTYPES and all(
            t.dtype == dtype and t.is_contiguous() and t.shape[-1] % LANES == 0 for t in tensors
        )

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' Qwen3VLTextRMSNorm of x (..., dim) with a weight of x's dtype (bfloat16
        or float32)."""
        if not self.takes(x, weight):
            raise ValueError("expected contiguous bfloat16 or float32 x and weight of one dtype")
        out = torch.empty_like(x)
        dim = x.shape[-1]
        self._norm(
            x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps,
            int(x.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def silu_gate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate and up of one shape and dtype; in bfloat16 rounded as
        transformers' operators round: bfloat16(bfloat16(silu(gate)) * up)."""
        if gate.shape != up.shape or not self.takes(gate, up):
            raise ValueError("expected contiguous gate and up of one shape and dtype")
        out = torch.empty_like(gate)
        columns = gate.shape[-1]
        self._silu_gate(
            gate.data_ptr(), up.data_ptr(), columns, out.data_ptr(), gate.numel() // columns,
            columns, int(gate.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def norm_rotate(
        self, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """x (B, S, H, D) -> (B, H, S, D): each head's RMSNorm, then the rotary embedding with
        cos/sin (B, S, D), all of x's dtype, rounded (bfloat16) as transformers' q_norm and
        apply_rotary_pos_emb round."""
        if not self.takes(x, weight, cos, sin):
            raise ValueError("expected contiguous bfloat16 or float32 tensors of one dtype")
        batch, seq, heads, dim = x.shape
        out = x.new_empty((batch, heads, seq, dim))
        self._norm_rotate(
            x.data_ptr(), weight.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
            batch, seq, heads, dim, eps, int(x.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        return out


@functools.lru_cache(maxsize=1)
def load_ops() -> PrefillOps | None:
    library = load_library("prefill_ops", COMPILE_FLAGS, CPU_FLAGS)
    return None if library is None else PrefillOps(library)


class FastRMSNorm(nn.Module):
    """Qwen3VLTextRMSNorm with the same weight; bfloat16 inputs go through the kernel."""

    def __init__(self, norm: Any, ops: PrefillOps, dtypes: frozenset[torch.dtype] = BF16_ONLY) -> None:
        super().__init__()
        self.weight: nn.Parameter = norm.weight
        self.variance_epsilon = float(norm.variance_epsilon)
        self._ops = ops
        self._dtypes = dtypes

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if (
            served(hidden_states, self._dtypes)
            and self._ops.takes(hidden_states, self.weight)
            and not torch.is_grad_enabled()
        ):
            return self._ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


class FastMLP(nn.Module):
    """Qwen3VLTextMLP with the same projections: down(silu(gate(x)) * up(x)), the middle in C for
    bfloat16."""

    def __init__(self, mlp: Any, ops: PrefillOps, dtypes: frozenset[torch.dtype] = BF16_ONLY) -> None:
        super().__init__()
        self.gate_proj: nn.Module = mlp.gate_proj
        self.up_proj: nn.Module = mlp.up_proj
        self.down_proj: nn.Module = mlp.down_proj
        self.act_fn: nn.Module = mlp.act_fn
        self._ops = ops
        self._dtypes = dtypes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if served(gate, self._dtypes) and self._ops.takes(gate, up) and not torch.is_grad_enabled():
            middle = self._ops.silu_gate(gate, up)
        else:
            middle = self.act_fn(gate) * up
        out: torch.Tensor = self.down_proj(middle)
        return out


class FastTextAttention(nn.Module):
    """Qwen3VLTextAttention with the same projections and head norms (and the attributes the
    attention functions read); for bfloat16, the query and key head norms and the rotary
    embedding are one C pass each (transformers: a norm of six operators, then ten for the
    rotation), whose output is already laid out (batch, heads, seq, dim)."""

    def __init__(self, attention: Any, ops: PrefillOps, dtypes: frozenset[torch.dtype] = BF16_ONLY) -> None:
        super().__init__()
        self.q_proj: Any = attention.q_proj
        self.k_proj: Any = attention.k_proj
        self.v_proj: Any = attention.v_proj
        self.o_proj: Any = attention.o_proj
        self.q_norm: Any = attention.q_norm
        self.k_norm: Any = attention.k_norm
        self.config: Any = attention.config
        # what transformers' attention functions read from the module
        self.layer_idx: int = attention.layer_idx
        self.layer_type: Any = getattr(attention, "layer_type", None)
        self.head_dim: int = attention.head_dim
        self.num_key_value_groups: int = attention.num_key_value_groups
        self.scaling: float = attention.scaling
        self.attention_dropout: float = attention.attention_dropout
        self.is_causal: bool = attention.is_causal
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.qwen3_vl import modeling_qwen3_vl

        # transformers' own functions, for what the C pass does not take and for the attention
        self._rotate: Any = modeling_qwen3_vl.apply_rotary_pos_emb
        self._eager: Any = modeling_qwen3_vl.eager_attention_forward
        self._attention_function: Any = ALL_ATTENTION_FUNCTIONS.get_interface
        self._ops = ops
        self._dtypes = dtypes

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        if self._fused(q, k, cos, sin):
            q = self._ops.norm_rotate(q, self.q_norm.weight, cos, sin, self.q_norm.variance_epsilon)
            k = self._ops.norm_rotate(k, self.k_norm.weight, cos, sin, self.k_norm.variance_epsilon)
        else:
            q, k = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2)
            q, k = self._rotate(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attend = self._attention_function(self.config._attn_implementation, self._eager)
        out, weights = attend(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
            **kwargs,
        )  # fmt: skip
        projected: torch.Tensor = self.o_proj(out.reshape(*input_shape, -1).contiguous())
        return projected, weights

    def _fused(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        weights = (self.q_norm.weight, self.k_norm.weight)
        return (
            not torch.is_grad_enabled()
            and q.dim() == 4
            and served(q, self._dtypes)
            and q.shape[-1] % 32 == 0
            and q.shape[-1] <= 256
            and cos.shape == sin.shape == (q.shape[0], q.shape[1], q.shape[3])
            and self._ops.takes(q, k, cos, sin, *weights)
        )


def use_fast_prefill_ops(model: Any) -> int:
    """Swap the language model's RMSNorm, attention and MLP modules (SiLU MLPs only); returns
    how many (0: left as they are, e.g. where the kernel does not build)."""
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if language_model is None:
        return 0
    found = [
        (parent, name, child)
        for parent in language_model.modules()
        for name, child in parent.named_children()
        if type(child).__name__ in (NORM_CLASS, ATTENTION_CLASS)
        or (type(child).__name__ == MLP_CLASS and type(child.act_fn).__name__ == "SiLUActivation")
    ]
    if not found:
        return 0
    ops = load_ops()
    if ops is None:
        return 0
    # float32 too where the tier has no bf16 arithmetic: the bf16 model computes in float32 there
    dtypes = BF16_ONLY if active_tier().bf16_arithmetic else frozenset(DTYPES)
    swaps: dict[str, Any] = {NORM_CLASS: FastRMSNorm, MLP_CLASS: FastMLP, ATTENTION_CLASS: FastTextAttention}
    # the attention modules last: their swaps take the head norms as they are by then (swapped)
    for parent, name, child in sorted(found, key=lambda f: type(f[2]).__name__ == ATTENTION_CLASS):
        setattr(parent, name, swaps[type(child).__name__](child, ops, dtypes))
    logger.info(
        "prefill kernels on %d RMSNorm, MLP and attention modules (%s)",
        len(found),
        ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes)),
    )
    return len(found)
