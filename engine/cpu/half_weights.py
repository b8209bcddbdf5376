"""Half-size weights where the CPU has no bf16 arithmetic: a bfloat16 model computes in float32.

On a tier without bf16 arithmetic (AVX2, AVX-512 without BF16, NEON without bf16) torch's bf16
operators are emulated: a 300-row prompt's 2048x6144 product takes ~3x the float32 one on AVX2.
Converting the whole model to float32 instead (what `dtype=auto` did) doubles its memory (13 GB
RSS for Qwen3-VL-2B), costs a conversion pass at load and doubles the bytes a decode step reads.

So the model is loaded in bfloat16 and, here, made to compute in float32 while the language
model's large matrices stay bfloat16 in memory:
- its linear layers and output head become engine.cpu.kernels.bf16_kernel.DecodeLinear, which
  multiplies float32 activations by the bf16 weights (decode steps: the C kernel, reading half
  the bytes of float32 weights; prompts: on the AVX2 tier engine.cpu.kernels.bf16_gemm's C
  product, elsewhere weights widened block by block for oneDNN's float32 product);
- the token embedding stays bfloat16 (tied to the output head) and hands out float32 rows;
- on the AVX2 tier the vision tower's linears too (DecodeLinear, bf16_gemm's product: as fast
  as oneDNN's over the float32 copies on a Zen3, 8.3-8.7 s against 8.3-8.5 s for a 640x480
  photo's encoder, with 0.78 GB less peak memory and no copies to make after load);
- everything else (norms, rotary tables, elsewhere the vision tower: ~0.4 B parameters whose
  float32 products are the fastest there, through oneDNN: engine.cpu.onednn_linear) is
  converted to float32, one tensor at a time, each bf16 original's pages of the safetensors file
  mapping released as soon as it is converted (otherwise the vision tower stays resident twice,
  0.8 GB of file pages beside its 1.6 GB float32 copy, until the mapping closes: Qwen3-VL-2B's
  peak RSS on forced AVX2 was weights + 1.8 GB). The vision linears' weights, nearly all of it,
  are converted after load, in the engine's idle-time preparation or at their first product
  (onednn_linear.OneDnnLinear.widen): ~0.95 s less load-to-ready on a 2.45 GHz Zen3.
Answers then match the float32 model as closely as bf16 rounding of the weights allows. The KV
cache is kept in bfloat16 too (`cache_dtype`, engine.qwen.kvbuffer), as the bf16 model keeps it:
a decode step reads half the bytes from it (4 conversations at 400 tokens: 184 instead of 367 MB
a step).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from engine.cpu import onednn_linear
from engine.cpu.hugepages import file_mappings, release_file_pages
from engine.cpu.kernels import bf16_gemm
from engine.cpu.kernels.bf16_kernel import load_kernel, swap_bf16_linears, use_for_decode
from engine.cpu.tiers import active_tier

logger = logging.getLogger("vlbot.engine")


def _float_rows(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def compute_in_float32(model: Any) -> bool:
    """Make a bfloat16 Qwen-VL model compute in float32 with its language model's linear weights
    kept bfloat16, where the active tier has no bf16 arithmetic and the bf16 kernel builds.
    Returns whether it did (False: the model is left as it is)."""
    if active_tier().bf16_arithmetic:
        return False
    try:
        language_model = model.model.language_model
        embedding = language_model.embed_tokens
    except AttributeError:
        return False
    if not isinstance(embedding, nn.Embedding) or embedding.weight.dtype != torch.bfloat16:
        return False
    kernel = load_kernel()
    if kernel is None:
        logger.info("no bf16 kernel on tier %s: the bf16 model keeps torch's operators", active_tier().name)
        return False
    keep = {id(embedding.weight)}
    keep.update(id(m.weight) for m in language_model.modules() if isinstance(m, nn.Linear))
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        keep.add(id(head.weight))
    # the other linears (the vision tower's): bf16 through the prompt product where it wins
    # (kernels/bf16_gemm), else widened after load for oneDNN (OneDnnLinear)
    prompt_product = bf16_gemm.load_kernel() is not None
    if prompt_product or onednn_linear.available():
        keep.update(id(m.weight) for m in model.modules() if type(m) is nn.Linear)
    mappings = file_mappings()
    for module in model.modules():
        for parameter in list(module.parameters(recurse=False)):
            if parameter.dtype == torch.bfloat16 and id(parameter) not in keep:
                bf16 = parameter.data
                parameter.data = bf16.float()
                release_file_pages([bf16], mappings)  # nothing reads the bf16 original again
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.dtype == torch.bfloat16:
                setattr(module, name, buffer.float())
    embedding.register_forward_hook(_float_rows)
    swapped = use_for_decode(model)
    if prompt_product:
        bf16_rest = swap_bf16_linears(model, kernel)  # those outside the language model
        swapped += bf16_rest
        logger.info(
            "tier %s has no bf16 arithmetic: bf16 weights in memory, float32 compute (%d linears,"
            " %d of them outside the language model)",
            active_tier().name,
            swapped,
            bf16_rest,
        )
        return True
    # the rest (the vision tower, its mergers) multiplies float32 through oneDNN, not MKL
    onednn = onednn_linear.use_onednn_linears(model, widen_later=True)
    logger.info(
        "tier %s has no bf16 arithmetic: bf16 weights in memory, float32 compute (%d linears;"
        " %d float32 linears through oneDNN)",
        active_tier().name,
        swapped,
        onednn,
    )
    return True


def cache_dtype(model: Any) -> torch.dtype | None:
    """The dtype the KV cache keeps keys and values in: bfloat16 for a model `compute_in_float32`
    made compute in float32 over bf16 weights (its embedding still bf16, its norms float32), else
    None (the model's own)."""
    try:
        language_model = model.model.language_model
        embedding = language_model.embed_tokens.weight.dtype
        norm = language_model.norm.weight.dtype
    except AttributeError:
        return None
    return torch.bfloat16 if embedding == torch.bfloat16 and norm == torch.float32 else None
