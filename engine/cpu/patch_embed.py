"""The vision encoder's patch embedding as one matrix product instead of a 3-D convolution.

Qwen-VL vision towers embed each flattened patch (channels x 2 frames x 16 x 16 pixels) with an
`nn.Conv3d` whose kernel equals its stride and the input: every output is the dot product of one
patch with one filter, i.e. a linear layer. oneDNN's Conv3d path takes ~0.5 s for a 1080p
screenshot's 4,144 patches on 2 cores here (8 % of the vision encoder); the same product as a
matrix multiply takes a few milliseconds. `PatchLinear` replaces the convolution in place, reusing
its weight (no copy) and falling back to the convolution for any input it does not cover.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("vlbot.engine")


class PatchLinear(nn.Module):
    """A kernel-equals-stride Conv3d computed as x.flatten(1) @ W.T + b when the input is exactly
    one kernel-sized patch per row; other inputs go through the convolution unchanged."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.out_channels = conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or tuple(x.shape[1:]) != tuple(self.weight.shape[1:]):
            return F.conv3d(x, self.weight, self.bias, stride=self.stride)
        rows = x.shape[0]
        flat = x.reshape(rows, -1)
        out = F.linear(flat, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(rows, self.out_channels, 1, 1, 1)


def _is_patch_conv(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv3d)
        and tuple(module.kernel_size) == tuple(module.stride)
        and all(p == 0 for p in module.padding)  # type: ignore[union-attr]
        and tuple(module.dilation) == (1, 1, 1)
        and module.groups == 1
    )


def linearize_patch_embedding(model: Any) -> bool:
    """Swap the vision tower's patch-embedding convolution for `PatchLinear`; False if the model
    has no such convolution (the model is left as it was)."""
    embed = getattr(getattr(getattr(model, "model", None), "visual", None), "patch_embed", None)
    conv = getattr(embed, "proj", None)
    if embed is None or conv is None or not _is_patch_conv(conv):
        return False
    embed.proj = PatchLinear(conv)
    logger.debug("vision patch embedding runs as a matrix product")
    return True
