"""SwiGLU feed-forward network in LightningDiT's layout (its `SwiGLUFFN`).

One fused input projection `w12`: Linear(D, 2H) whose output halves (a, b) give SiLU(a) * b, then
`w3`: Linear(H, D); both with biases. The hidden width is LightningDiT's rule
H = int(2/3 * int(D * mlp_ratio)), without rounding: 1152 -> 3072, 1024 -> 2730 at ratio 4. With
it, parameters and multiply-adds equal those of the GELU MLP (3 x D x 8D/3 = 8 D^2).
DDT's SwiGLU (three bias-free matrices) and REPA's MMDiT (H rounded up to a multiple of 256) use
other layouts and are not weight-compatible with this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_size(dim: int, mlp_ratio: float = 4.0) -> int:
    """LightningDiT's SwiGLU width for a block of width `dim` (the same float expression)."""
    return int(2 / 3 * int(dim * mlp_ratio))


class SwiGLU(nn.Module):
    """x -> w3(SiLU(a) * b) with (a, b) = w12(x) split in halves; keys `w12`, `w3`."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)
