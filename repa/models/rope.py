"""2-D rotary position embedding (RoPE) on queries and keys, in LightningDiT's layout (EVA-02's
`VisionRotaryEmbeddingFast`), so LightningDiT's weights see the rotations they were trained with.

For a head of width d on a g x g token grid (tokens row-major):
  - the first d/2 channels rotate with the token's row index, the last d/2 with its column index;
  - within each half, channel pair (2i, 2i+1) turns by the angle p * f_i, p the integer grid index,
    f_i = theta^(-2i / (d/2)) for i = 0 .. d/4 - 1, theta = 10000;
  - a pair (a, b) becomes (a cos - b sin, b cos + a sin).
So d must be divisible by 4 (72 for the XL sizes: 18 frequencies per axis).

The tables depend only on the grid and the head width, so they are rebuilt for whatever grid the
model is built for (a model trained at 256 px samples at 512 px) and are not part of the state
dict; LightningDiT's files carry them as `feat_rope.freqs_cos` / `freqs_sin`, which the strict
loader checks against ours and drops (repa/models/sit.py, `load_state_dict_strict`).
"""

from __future__ import annotations

import torch
from torch import nn

ROPE_THETA = 10000.0


def rope_2d_angles(head_dim: int, grid_size: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """(grid_size**2, head_dim) float64 rotation angles; channels 2i and 2i+1 share an angle."""
    if head_dim % 4:
        raise ValueError(
            f"2-D RoPE needs a head width divisible by 4 (two axes of channel pairs), got {head_dim}"
        )
    axis_dim = head_dim // 2
    freqs = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)  # (d/4,)
    positions = torch.arange(grid_size, dtype=torch.float64)
    per_axis = (positions[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (g, d/2)
    rows = per_axis[:, None, :].expand(grid_size, grid_size, axis_dim)  # indexed by (row, col)
    cols = per_axis[None, :, :].expand(grid_size, grid_size, axis_dim)
    return torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d): each channel pair (a, b) becomes (-b, a)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


class RotaryEmbedding2D(nn.Module):
    """Rotates (B, heads, T, head_dim) queries or keys by their token's grid position."""

    def __init__(self, head_dim: int, grid_size: int, theta: float = ROPE_THETA):
        super().__init__()
        angles = rope_2d_angles(head_dim, grid_size, theta)
        # Not persistent: rebuilt for the model's grid, never read from a checkpoint.
        self.register_buffer("freqs_cos", angles.cos().float(), persistent=False)  # (T, head_dim)
        self.register_buffer("freqs_sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed at the tables' precision (float32), returned in x's dtype (bf16 under autocast).
        return (x * self.freqs_cos + rotate_pairs(x) * self.freqs_sin).to(x.dtype)
