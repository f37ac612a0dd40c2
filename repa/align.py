"""Representation-alignment losses (REPA).

The diffusion model's projected hidden tokens h (one set per target encoder) are pulled towards
the frozen encoder's patch tokens z by negative cosine similarity:

    L = -(1 / (K B)) sum_k sum_b mean_t cos(h[k, b, t], z[k, b, t])

Range [-1, 1]; -1 means perfectly aligned. Vectorised over batch and tokens (the reference code
loops over samples in Python); the loop over encoders stays, since their widths differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange


def resample_tokens(tokens: torch.Tensor, num_tokens: int, mode: str = "bicubic") -> torch.Tensor:
    """Resample a square token grid (B, T, D) to (B, num_tokens, D) by 2-D interpolation.

    For aligning a model whose token grid differs from the encoder's (opt-in: a mismatch is
    normally a configuration error).
    """
    tokens_in = tokens.shape[1]
    side_in, side_out = math.isqrt(tokens_in), math.isqrt(num_tokens)
    if side_in**2 != tokens_in or side_out**2 != num_tokens:
        raise ValueError(f"token resampling needs square grids, got {tokens_in} -> {num_tokens} tokens")
    if tokens_in == num_tokens:
        return tokens
    grid = rearrange(tokens, "b (h w) d -> b d h w", h=side_in)  # (B, D, s, s)
    grid = F.interpolate(grid.float(), size=(side_out, side_out), mode=mode, align_corners=False)
    return rearrange(grid, "b d h w -> b (h w) d").to(tokens.dtype)  # (B, T', D)


def token_cosine(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean cosine similarity over tokens: (B, T, D), (B, T, D) -> (B,)."""
    projected = F.normalize(projected.float(), dim=-1, eps=1e-12)
    target = F.normalize(target.float(), dim=-1, eps=1e-12)
    return (projected * target).sum(dim=-1).mean(dim=-1)


def alignment_loss(
    projected: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], resample: bool = False
) -> torch.Tensor:
    """REPA's loss: minus the cosine similarity averaged over tokens, batch and encoders.

    projected[k]: (B, T, D_k) from the diffusion model's k-th projector;
    targets[k]: (B, T_k, D_k) from the k-th frozen encoder (detached by the caller or not: no
    gradient is needed there). resample=True interpolates targets to the model's token grid
    when T_k != T; otherwise a mismatch is an error.
    """
    if len(projected) != len(targets) or not projected:
        raise ValueError(
            f"alignment needs one target per projector: "
            f"got {len(projected)} projections and {len(targets)} targets"
        )
    cosines = []
    for k, (h, z) in enumerate(zip(projected, targets)):
        if h.shape[0] != z.shape[0]:
            raise ValueError(f"encoder {k}: batch size of projections {h.shape[0]} != targets {z.shape[0]}")
        if h.shape[-1] != z.shape[-1]:
            raise ValueError(
                f"encoder {k}: projector outputs {h.shape[-1]} features but the encoder gives {z.shape[-1]}; "
                "build the model with projector_out_dims matching the encoder dims"
            )
        if h.shape[1] != z.shape[1]:
            if not resample:
                raise ValueError(
                    f"encoder {k}: the model has {h.shape[1]} tokens but the encoder gives {z.shape[1]}; "
                    "match them with the resolution / patch size (e.g. 256px, SiT-*/2 on 32x32 latents and "
                    "DINOv2/14 at 224px both give 256 tokens) or opt in to resampling the targets"
                )
            z = resample_tokens(z, h.shape[1])
        cosines.append(token_cosine(h, z).mean())
    return -torch.stack(cosines).mean()
