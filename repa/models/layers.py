"""Building blocks of the diffusion backbones, one small class per idea.

Module and parameter names follow the published DiT/SiT/REPA code so that their checkpoints load
with strict key matching (`x_embedder.proj`, `t_embedder.mlp.{0,2}`, `y_embedder.embedding_table`,
`attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`, ...), and LightningDiT's for its options
(`norm1.weight` of RMSNorm). The larger option blocks have their own files: swiglu.py, rope.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation. x: (B, T, D); shift, scale: (B, D) broadcast over tokens.

    shift None: scale only (LightningDiT's `wo_shift` blocks)."""
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, eps 1e-6, weight learned from ones.

    Normalised in float32 and cast back before the weight, as LightningDiT's RMSNorm (key `weight`).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def block_norm(dim: int, rmsnorm: bool) -> nn.Module:
    """The norm before attention, MLP and final layer: DiT's affine-free LayerNorm (eps 1e-6), or
    RMSNorm with a learned scale (LightningDiT's `use_rmsnorm`)."""
    return RMSNorm(dim) if rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) with T = (H/p)(W/p), tokens in row-major order.

    A strided convolution, stored as `proj` (timm's PatchEmbed layout, which DiT/SiT use).
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar time -> D-dim vector: 256 sinusoidal features, then Linear, SiLU, Linear.

    REPA/SiT feed the raw t in [0, 1] (not t*1000 as DiT does); `time_scale` covers both.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, time_scale: float = 1.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.time_scale = time_scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def sinusoidal_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """t: (B,) -> (B, dim) = [cos(t f), sin(t f)], f_i = max_period^(-i / (dim/2))."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        angles = t.float()[:, None] * freqs[None]  # (B, half)
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if dim % 2:
            features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
        return features

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.sinusoidal_features(t * self.time_scale, self.frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> D-dim vector. Row `num_classes` is the null class used for CFG.

    During training each label is replaced by the null class with probability `dropout_prob`
    (classifier-free guidance training).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        # REPA/DiT keep the null row even when dropout is 0, so published tables have num_classes + 1 rows.
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def drop_labels(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(device=labels.device, dtype=torch.bool)
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """force_drop_ids: (B,) bool, which labels to drop, in place of the embedder's own draw
        (DiT's argument; the training step draws it with the rest of the step's randomness)."""
        if force_drop_ids is not None or (train and self.dropout_prob > 0):
            labels = self.drop_labels(labels, force_drop_ids)
        return self.embedding_table(labels)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two batched matrix products; q, k, v: (B, heads, T, d).

    Used on CPU for bf16/fp16 inputs, where torch's fused CPU attention kernel is slower for
    SiT's 256-token sequences: the whole SiT-B/2 bf16 training step (batch 8) ran 1.07x faster
    with this (median of 8 interleaved rounds, faster in 6 of them), for about 200 MB more peak
    memory, since the (B, heads, T, T) scores are held for the backward pass:
    `python benchmarks/bench_train.py --models SiT-B/2 --precisions bf16 --on-the-fly "" --repeats 8`
    (variant "... sdpa-attention" is the fused kernel). GPUs and fp32 keep the fused kernel; set
    `Attention.cpu_low_precision_kernel = "sdpa"` where the T^2 scores would not fit in memory.
    The softmax accumulates in float32 inside its kernel and rounds its output to the input dtype.
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, T, T)
    return scores.softmax(dim=-1) @ v  # (B, heads, T, d)


class Attention(nn.Module):
    """Multi-head self-attention through torch's scaled_dot_product_attention.

    Optional qk-norm over each head's channels, keys `q_norm.*` and `k_norm.*`: a LayerNorm with
    affine parameters (timm's `Attention(qk_norm=True)`, which REPA uses), or with `rms_qk_norm` an
    RMSNorm (LightningDiT's qk-norm when its blocks use RMSNorm). `rope`, given to forward,
    rotates q and k after the qk-norm (LightningDiT's order).

    On CPU with bf16/fp16 activations (autocast) the product runs as two matmuls instead
    (`matmul_attention`, faster there); set `cpu_low_precision_kernel = "sdpa"` on an instance to
    use the fused kernel everywhere (the benchmarks compare the two).
    """

    cpu_low_precision_kernel: str = "matmul"  # "matmul" | "sdpa"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        rms_qk_norm: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        norm = RMSNorm if rms_qk_norm else nn.LayerNorm
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        if (
            q.device.type == "cpu"
            and q.dtype in (torch.bfloat16, torch.float16)
            and self.cpu_low_precision_kernel == "matmul"
        ):
            x = matmul_attention(q, k, v)  # (B, heads, T, head_dim)
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return self.proj(rearrange(x, "b h t d -> b t (h d)"))  # (B, T, D)


class Mlp(nn.Module):
    """Linear, GELU(tanh), Linear; keys `fc1`, `fc2` as in timm's Mlp."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_projector(hidden_size: int, projector_dim: int, target_dim: int) -> nn.Sequential:
    """REPA's projector: Linear(D, P), SiLU, Linear(P, P), SiLU, Linear(P, target_dim); keys 0, 2, 4."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, target_dim),
    )


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, (grid_size**2, dim), tokens in row-major order.

    The first dim/2 channels encode the column index and the last dim/2 the row index; each half
    is [sin(pos w), cos(pos w)] with w_k = 10000^(-k / (dim/4)) (the MAE/DiT layout).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a hidden size divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)  # (dim/4,)
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

    def embed_1d(positions: np.ndarray) -> np.ndarray:
        angles = positions.reshape(-1)[:, None].astype(np.float64) * omega[None]  # (T, dim/4)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (T, dim/2)

    return np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1).astype(np.float32)
