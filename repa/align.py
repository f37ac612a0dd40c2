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


# ----------------------------------------------------------------------------------------------
# Target options and the other representation objectives (docs/objectives.md)


def spatial_zscore(tokens: torch.Tensor, gamma: float = 0.6, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's spatial normalisation of target tokens, (B, T, D) -> (B, T, D):
    (z - gamma * mean_T z) / (std_T z + eps), statistics over the tokens of each image and
    channel. std is the unbiased one (torch's default, as iREPA's code)."""
    tokens = tokens.float()
    mean = tokens.mean(dim=1, keepdim=True)
    std = tokens.std(dim=1, keepdim=True)
    return (tokens - gamma * mean) / (std + eps)


def derangement(keys: torch.Tensor) -> torch.Tensor:
    """(B,) random keys -> (B,) indices `source` with source[i] != i for B > 1: the samples,
    ordered by their keys, each take the next one's (a single random cycle). Applied as
    tokens[source], every sample aligns to another sample's tokens (the control arm)."""
    order = keys.argsort()
    source = torch.empty_like(order)
    source[order] = order.roll(-1)
    return source


def gather_differentiable(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each process -> (world * B, ...), rank order, with gradient: the backward pass
    returns to each process the gradient of every process's use of its samples (summed). One
    process (or no process group): x itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def dispersive_loss(hidden: torch.Tensor, temperature: float = 1.0, gather: bool = True) -> torch.Tensor:
    """The dispersive loss (InfoNCE's repulsive half) of hidden states (B, T, D), as the DDT code:
    each sample's flattened state L2-normalised, squared distances d_ij over all pairs i < j of the
    batch (the global one across processes when `gather`, through a differentiable gather),
    L = log(mean_{i<j} exp(-d_ij / temperature) + 1e-5). Needs >= 2 samples in all."""
    flat = F.normalize(hidden.float().flatten(1), dim=-1)  # (B, T*D)
    if gather:
        flat = gather_differentiable(flat)  # (world * B, T*D)
    if flat.shape[0] < 2:
        raise ValueError("the dispersive loss needs at least 2 samples per micro-batch (all processes)")
    squared = torch.pdist(flat).square()  # (B (B-1) / 2,) pairs i < j
    return torch.log(torch.exp(-squared / temperature).mean() + 1e-5)


SRA_COSINES = ("per-token", "token-axis")


def self_alignment_loss(
    student: torch.Tensor, teacher: torch.Tensor, form: str = "per-token"
) -> torch.Tensor:
    """SRA's 1 - cosine between the student's head output and the teacher's block output, both
    (B, T, D). per-token: cosine over the D features of each token, mean over tokens and batch.
    token-axis: SRA's published code (cosine_similarity with its default dim=1 on (B, T, D)):
    cosine over the T tokens of each feature channel (its spatial pattern), mean over channels
    and batch."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    if form not in SRA_COSINES:
        raise ValueError(f"SRA cosine form {form!r} is not one of: {', '.join(SRA_COSINES)}")
    dim = -1 if form == "per-token" else 1
    cosine = F.cosine_similarity(student.float(), teacher.float(), dim=dim)  # (B, T) or (B, D)
    return (1 - cosine).mean()


def attention_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """HASTE's attention distillation for one layer pair: the cross-entropy of the student's
    attention (softmax of its pre-softmax logits over the keys) against the teacher's attention
    as the target distribution, both (B, H, T, T) over the same T tokens and H heads; mean over
    queries, heads and batch. The teacher's side carries no gradient."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student attention {tuple(student_logits.shape)} and teacher attention "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    target = teacher_logits.detach().float().softmax(dim=-1)
    return -(target * student_logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()
