"""Alignment projectors beside REPA's MLP (repa.models.layers.build_projector).

iREPA's convolutional projector: one Conv2d(D, D_k, k, padding k // 2) on the 2-D token grid, so
each projected token sees its k x k neighbours (iREPA's `ProjectionLayer`, type "conv"). It is a
training-only module owned by the training method (repa/train/methods/denoising.py), never part
of the SiT's checkpoint or its sampling path.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


class ConvProjector(nn.Module):
    """(B, T, D) tokens of a square grid -> (B, T, out_dim), one convolution on the grid."""

    def __init__(self, hidden_size: int, out_dim: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"the conv projector's kernel size must be odd and >= 1, got {kernel_size}")
        self.conv = nn.Conv2d(hidden_size, out_dim, kernel_size, padding=kernel_size // 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(
                f"the conv projector needs a square token grid, got {tokens.shape[1]} tokens (with TREAD, "
                "keep the alignment depth outside the route)"
            )
        grid = rearrange(tokens, "b (h w) d -> b d h w", h=side)  # (B, D, s, s)
        return rearrange(self.conv(grid), "b d h w -> b (h w) d")  # (B, T, out_dim)
