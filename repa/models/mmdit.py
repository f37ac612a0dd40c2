"""MMDiT: REPA's text-to-image backbone (an SD3-style multi-modal DiT), in REPA's key layout.

Two streams of tokens, image and text, each with its own weights (adaLN modulation, qkv, output
projection, MLP) in every block, and one attention over their concatenation [text; image]:

    joint_blocks.N.context_block.*   the text stream: adaLN_modulation.1, attn.qkv, attn.proj, mlp.fc{1,2}
    joint_blocks.N.x_block.*         the image stream: the same keys
    x_embedder.proj, t_embedder.mlp.{0,2}, context_embedder (Linear(context_dim, D)), pos_embed,
    final_layer.{linear, adaLN_modulation.1}, projectors.K.{0,2,4}

Both streams are modulated by the time embedding only (6D per block: shift, scale, gate for the
attention and the MLP). In the last block the text stream only feeds the attention (`pre_only`:
2D modulation, qkv, no output projection or MLP; its outputs are discarded). The REPA tap is on
the image tokens after block `align_depth`. REPA's width rule: hidden = 32 x depth, heads = depth
(`mmdit_config`). Like REPA's, the fixed sin-cos `pos_embed` is a saved buffer and the text has no
pooled vector; unlike REPA's (a 16 x 16 grid at most), any grid works.

Differences that are options (REPA's behaviour is the default):
  use_context_mask   True: padding tokens of the text are masked out of the joint attention's
                     keys; False (REPA: U-ViT's CLIP features attend all 77 tokens): the mask is
                     ignored.
  null_context       "empty" (REPA): a dropped caption becomes the text encoder's embedding of the
                     empty caption, given by `set_null_context` (the shards' `null_text.npy`, or the
                     encoder at sampling time); not saved, so REPA's checkpoints load strictly;
                     "learned": a learned (context_length, context_dim) table `null_context`.
  adaln_zero         False (REPA: PyTorch's default initialisation); True: DiT's adaLN-Zero (zero
                     modulation and final layer: every block starts as the identity).

Time convention: REPA's, t=0 data, t=1 noise, the raw t in [0, 1] (as the SiT).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from repa.models.layers import (
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    build_projector,
    modulate,
    sincos_pos_embed_2d,
)
from repa.models.sit import FinalLayer

MMDIT_NULL_CONTEXT_MODES = ("empty", "learned")


@dataclass
class MMDiTConfig:
    """Everything needed to rebuild an MMDiT; stored in checkpoints next to the state dict."""

    input_size: int = 32  # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 768  # REPA: 32 x depth
    depth: int = 24
    num_heads: int = 24  # REPA: depth (head width 32)
    mlp_ratio: float = 4.0
    context_dim: int = 768  # width of the cached text tokens (CLIP-L: 768)
    context_length: int = 77  # tokens per caption (the learned null context's rows)
    caption_dropout_prob: float = 0.1  # the model's own draw in train mode without force_drop_ids
    null_context: str = "empty"
    use_context_mask: bool = False
    adaln_zero: bool = False
    align_depth: int = 8  # REPA's encoder_depth: the tap after this block (1-based)
    projector_out_dims: list[int] = field(default_factory=list)
    projector_dim: int = 2048

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(
                f"latent size {self.input_size} is not divisible by patch size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.depth < 1:
            raise ValueError(f"an MMDiT needs at least one joint block, got depth {self.depth}")
        if self.projector_out_dims and not 1 <= self.align_depth <= self.depth:
            raise ValueError(
                f"align depth {self.align_depth} is out of range: it counts joint blocks from 1 and this "
                f"model has {self.depth} (REPA's MMDiT uses 8)"
            )
        if self.null_context not in MMDIT_NULL_CONTEXT_MODES:
            raise ValueError(
                f"null_context {self.null_context!r} is not one of: {', '.join(MMDIT_NULL_CONTEXT_MODES)}"
            )
        self.projector_out_dims = [int(d) for d in self.projector_out_dims]

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2


def mmdit_config(depth: int = 24, **overrides) -> MMDiTConfig:
    """REPA's size rule: hidden = 32 x depth, heads = depth; overrides are MMDiTConfig fields."""
    return MMDiTConfig(**{"depth": depth, "hidden_size": 32 * depth, "num_heads": depth, **overrides})


# ----------------------------------------------------------------------------------------------
# Blocks


class StreamAttention(nn.Module):
    """One stream's part of the joint attention: its qkv, and its output projection unless
    `pre_only` (keys `qkv`, `proj`, as REPA's SelfAttention)."""

    def __init__(self, dim: int, num_heads: int, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, D) -> (3, B, heads, N, head_dim); REPA splits qkv as (3, heads, head_dim) per token
        return rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)


class StreamBlock(nn.Module):
    """One stream of a joint block (REPA's DismantledBlock): adaLN from the time embedding,
    pre-norm, gated residuals; `pre_only` (the last block's text stream) stops after its qkv."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = StreamAttention(hidden_size, num_heads, pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.num_modulations = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, self.num_modulations * hidden_size, bias=True)
        )

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """x: (B, N, D), c: (B, D) -> qkv (3, B, heads, N, head_dim) and what post_attention needs."""
        modulation = self.adaLN_modulation(c).chunk(self.num_modulations, dim=-1)
        shift_msa, scale_msa = modulation[:2]
        qkv = self.attn.qkv_heads(modulate(self.norm1(x), shift_msa, scale_msa))
        return qkv, (x, *modulation[2:])

    def post_attention(
        self,
        attended: torch.Tensor,
        x: torch.Tensor,
        gate_msa: torch.Tensor,
        shift_mlp: torch.Tensor,
        scale_mlp: torch.Tensor,
        gate_mlp: torch.Tensor,
    ) -> torch.Tensor:
        # attended: (B, N, D), this stream's rows of the joint attention's output
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attended)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """A text stream and an image stream attending jointly over [text; image]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.context_block = StreamBlock(hidden_size, num_heads, mlp_ratio, pre_only=pre_only)
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio)

    def forward(
        self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor, key_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """context: (B, L, D) text tokens; x: (B, T, D) image tokens; c: (B, D) time embedding;
        key_mask: (B, L + T) bool, True = attend, or None (all). Returns (context or None, x)."""
        context_qkv, context_rest = self.context_block.pre_attention(context, c)
        x_qkv, x_rest = self.x_block.pre_attention(x, c)
        q, k, v = torch.cat([context_qkv, x_qkv], dim=3).unbind(0)  # each (B, heads, L + T, head_dim)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, L + T)
        attended = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "b h n d -> b n (h d)")
        length = context.shape[1]
        x = self.x_block.post_attention(attended[:, length:], *x_rest)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(attended[:, :length], *context_rest), x


# ----------------------------------------------------------------------------------------------
# The model


class MMDiT(nn.Module):
    """forward(x, t, context=..., context_mask=...) -> (velocity (B, C, H, W), [projections])."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.context_embedder = nn.Linear(config.context_dim, hidden)
        # Fixed sin-cos table, a saved buffer (REPA's layout).
        pos_embed = torch.from_numpy(sincos_pos_embed_2d(hidden, config.grid_size)).unsqueeze(0)
        self.register_buffer("pos_embed", pos_embed)  # (1, T, D)
        self.feat_rope = None  # no RoPE tables; the SiT's strict loader looks for them
        if config.null_context == "learned":
            self.null_context = nn.Parameter(
                torch.randn(config.context_length, config.context_dim) / config.context_dim**0.5
            )
        else:  # the empty caption's embedding and mask, from set_null_context; never saved
            self.register_buffer("null_context", None, persistent=False)
            self.register_buffer("null_context_mask", None, persistent=False)
        self.joint_blocks = nn.ModuleList(
            [
                JointBlock(hidden, config.num_heads, config.mlp_ratio, pre_only=index == config.depth - 1)
                for index in range(config.depth)
            ]
        )
        self.final_layer = FinalLayer(hidden, config.patch_size, config.in_channels)
        self.projectors = nn.ModuleList(
            [build_projector(hidden, config.projector_dim, dim) for dim in config.projector_out_dims]
        )
        if config.adaln_zero:
            self.zero_adaln()

    def zero_adaln(self) -> None:
        """DiT's adaLN-Zero: zero modulations (every block the identity on both streams) and a zero
        final layer (zero velocity)."""
        for block in self.joint_blocks:
            for stream in (block.context_block, block.x_block):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)
        for module in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def set_null_context(self, embeddings: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """null_context="empty": the text encoder's embedding of the empty caption (L, context_dim)
        and its mask (L,), which a dropped caption becomes (`repa.data.shards.read_null_text`)."""
        if self.config.null_context != "empty":
            raise ValueError(f"this model's null context is {self.config.null_context!r}, not set from data")
        embeddings = torch.as_tensor(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.config.context_dim:
            raise ValueError(
                f"the null context must be (L, {self.config.context_dim}), got {tuple(embeddings.shape)}"
            )
        device = self.pos_embed.device
        self.null_context = embeddings.float().to(device)
        self.null_context_mask = None if mask is None else torch.as_tensor(mask).bool().to(device)

    # --- conditioning ---

    def _caption_drop(self, batch: int, device: torch.device, force_drop_ids: torch.Tensor | None):
        if force_drop_ids is None and self.training and self.config.caption_dropout_prob > 0:
            return torch.rand(batch, device=device) < self.config.caption_dropout_prob
        return None if force_drop_ids is None else force_drop_ids.to(device=device, dtype=torch.bool)

    def _null_for(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The null context for a batch padded to `length` tokens: (L, context_dim), mask (L,)."""
        if self.null_context is None:
            raise ValueError(
                "caption dropout needs the null caption: call set_null_context with the text encoder's "
                "embedding of the empty caption (the shards' null_text.npy), or use null_context='learned'"
            )
        if self.config.null_context == "learned":
            if length > self.null_context.shape[0]:
                raise ValueError(
                    f"captions of {length} tokens are longer than the learned null context "
                    f"({self.null_context.shape[0]} rows, context_length)"
                )
            return self.null_context[:length].to(dtype), None  # every row attended
        if self.null_context.shape[0] != length:
            raise ValueError(
                f"the null caption has {self.null_context.shape[0]} tokens and the captions {length}: "
                "they must come from one text encoder at one max length"
            )
        return self.null_context.to(dtype), self.null_context_mask

    def _embed_context(
        self, context: torch.Tensor, context_mask: torch.Tensor | None, drop: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> projected text tokens (B, L, D) and the text's key mask (B, L) bool or None."""
        config = self.config
        if context is None or context.ndim != 3 or context.shape[-1] != config.context_dim:
            shape = None if context is None else tuple(context.shape)
            raise ValueError(f"context must be (B, L, {config.context_dim}) text embeddings, got {shape}")
        batch, length = context.shape[:2]
        mask = None
        if config.use_context_mask and context_mask is not None:
            if tuple(context_mask.shape) != (batch, length):
                got = tuple(context_mask.shape)
                raise ValueError(f"context_mask must be {(batch, length)} (True = a token), got {got}")
            mask = context_mask.to(device=context.device) != 0
        if drop is not None and bool(drop.any()):
            null, null_mask = self._null_for(length, context.dtype)
            context = torch.where(drop[:, None, None], null.expand(batch, -1, -1), context)
            if mask is not None:
                null_rows = torch.ones(length, dtype=torch.bool, device=context.device)
                if null_mask is not None:
                    null_rows = null_mask.to(context.device)
                mask = torch.where(drop[:, None], null_rows[None], mask)
        return self.context_embedder(context), mask

    def _check_input(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.in_channels, c.input_size, c.input_size):
            raise ValueError(
                f"expected latents of shape (B, {c.in_channels}, {c.input_size}, {c.input_size}), "
                f"got {tuple(x.shape)}"
            )

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W); per token the order is (p_row, p_col, channel)."""
        p, grid = self.config.patch_size, self.config.grid_size
        return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=grid, p=p, q=p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
        align_only: bool = False,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Velocity and the projected image tokens of the REPA tap.

        x: (B, C, H, W) noisy latents; t: (B,) times in [0, 1]; y: None (no class labels).
        context: (B, L, context_dim) cached text tokens; context_mask: (B, L) bool/0-1, True = a
        caption token (used with use_context_mask). force_drop_ids: (B,) bool, captions replaced
        by the null caption (CFG training), in place of the model's own draw in train mode.
        align_only: stop after the tap and return (None, projections) (REPA-E's VAE step).
        """
        if align_only and not len(self.projectors):
            raise ValueError("align_only=True needs a model with projectors (projector_out_dims is empty)")
        return self._run(x, t, y, context, context_mask, force_drop_ids, tap=True, align_only=align_only)

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sampler's view: velocity only (the projectors are never evaluated); force_drop_ids
        (B,) bool: the rows to predict with the null caption."""
        velocity, _ = self._run(x, t, y, context, context_mask, force_drop_ids, tap=False, align_only=False)
        return velocity

    def _run(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        force_drop_ids: torch.Tensor | None,
        *,
        tap: bool,
        align_only: bool,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        if y is not None:
            raise ValueError("the MMDiT conditions on text only: pass y=None")
        self._check_input(x)
        drop = self._caption_drop(x.shape[0], x.device, force_drop_ids)
        text, text_mask = self._embed_context(context, context_mask, drop)  # (B, L, D), (B, L)
        tokens = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t)  # (B, D)
        key_mask = None
        if text_mask is not None:  # image tokens are always attended
            key_mask = torch.cat([text_mask, text_mask.new_ones(tokens.shape[:2])], dim=1)  # (B, L + T)
        projections: list[torch.Tensor] = []
        for depth, block in enumerate(self.joint_blocks, start=1):
            text, tokens = block(text, tokens, c, key_mask)
            if tap and depth == self.config.align_depth and len(self.projectors):
                projections = [projector(tokens) for projector in self.projectors]  # each (B, T, D_k)
                if align_only:
                    return None, projections
        return self.unpatchify(self.final_layer(tokens, c)), projections


# ----------------------------------------------------------------------------------------------
# Registry and loading

# name -> MMDiTConfig overrides (REPA's rule: hidden 32 x depth, heads = depth; patch 2)
MMDIT_MODELS: dict[str, dict] = {f"MMDiT-{depth}": {"depth": depth} for depth in (8, 12, 16, 24, 28)}


def create_mmdit(name: str = "MMDiT-24", **overrides) -> MMDiT:
    """Build a registered MMDiT, e.g. create_mmdit("MMDiT-24", projector_out_dims=[768]) (REPA's
    COCO model with DINOv2-B targets); overrides are MMDiTConfig fields."""
    if name not in MMDIT_MODELS:
        raise ValueError(f"unknown MMDiT {name!r}; choose one of: {', '.join(MMDIT_MODELS)}")
    unknown = set(overrides) - set(MMDiTConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown MMDiT option(s) {sorted(unknown)}; valid: {sorted(MMDiTConfig.__dataclass_fields__)}"
        )
    return MMDiT(mmdit_config(**{**MMDIT_MODELS[name], **overrides}))


def mmdit_config_for(name: str, **overrides) -> MMDiTConfig:
    """A registered MMDiT's config from the build path's keyword overrides (SiTConfig fields, as
    repa.config's model_overrides gives them): MMDiT fields are taken, the label dropout becomes
    the caption dropout, and a SiT option the MMDiT lacks is refused unless it has the SiT's
    default (so a plain `repa train --model MMDiT-24` works and `--tread-ratio 0.5` fails).
    Without context_dim (a config checked before its shards are read) REPA's 768 stands."""
    from repa.models.sit import SiTConfig

    if name not in MMDIT_MODELS:
        raise ValueError(f"unknown MMDiT {name!r}; choose one of: {', '.join(MMDIT_MODELS)}")
    sit_defaults = {f.name: f.default for f in dataclasses.fields(SiTConfig)}
    own = set(MMDiTConfig.__dataclass_fields__)
    values: dict = {}
    for key, value in overrides.items():
        if key == "class_dropout_prob":
            values["caption_dropout_prob"] = value
        elif key == "num_classes":
            continue  # text only: no labels (the build path refuses shards without cached text)
        elif key in own:
            values[key] = value
        elif key not in sit_defaults:
            raise ValueError(f"unknown model option {key!r} for {name}")
        elif value != sit_defaults[key] and value is not None:
            raise ValueError(
                f"{name} has no option {key}={value!r} (a SiT option): leave --{key.replace('_', '-')} unset"
            )
    return mmdit_config(**{**MMDIT_MODELS[name], **values})
