"""SiT: a DiT backbone trained with flow matching, with REPA's alignment tap.

Read top to bottom: blocks, final layer, the model, weight adapters, the size registry.
The module layout and parameter names match the published REPA / REPA-E checkpoints so that
they load with `strict=True` (the keys: docs/conventions.md, "Checkpoint keys").

Options of the block (SiTConfig fields, `repa train` flags), each composable with the others and
with the REPA tap:
  swiglu, rmsnorm, rope, qk_norm, wo_shift   LightningDiT's block (registered as LightningDiT-*),
                                             in its key layout, so its released weights load;
  adaln="single"                             PixArt's adaLN-single: one modulation MLP shared by
                                             all blocks plus a learned (6, D) table per block;
  grad_checkpointing                         recompute each block in the backward pass (training);
  context_dim (null_context, context_length) cross-attention to a sequence of embeddings (text)
                                             after each self-attention, PixArt's layout, with a
                                             key-padding mask and a null context for CFG
                                             (cross_attention.py); num_classes=0: no labels;
  tread_ratio (tread_start, tread_end)       TREAD: during training a fraction of the tokens skips
                                             a range of blocks (tread.py); eval never routes;
  class_token_dim                            REG: the encoder's (noised) class token as one extra
                                             token 0 with its own output head (docs/reg.md).

Time convention: REPA's, t=0 is data and t=1 is noise; the network sees the raw t in [0, 1].
`reverse_time` wraps weights trained the other way (LightningDiT's) so they speak ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from repa.models.cross_attention import NULL_CONTEXT_MODES, Context, ContextEmbedder, CrossAttention
from repa.models.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    block_norm,
    build_projector,
    modulate,
    sincos_pos_embed_2d,
)
from repa.models.rope import RotaryEmbedding2D
from repa.models.swiglu import SwiGLU, swiglu_hidden_size
from repa.models.tread import TokenRoute, num_kept_tokens, random_route_ids

# a REG model's velocity: (latent velocity (B, C, H, W), class-token velocity (B, class_token_dim))
ClassTokenVelocity = tuple[torch.Tensor, torch.Tensor]

ADALN_MODES = ("block", "single")

# ----------------------------------------------------------------------------------------------
# Blocks


class SiTBlock(nn.Module):
    """Transformer block with adaLN conditioning (pre-norm, gated residuals).

    The modulation is (shift, scale, gate) for attention and for the MLP, or (scale, gate) twice
    with `wo_shift`. With adaln="block" (DiT's adaLN-Zero) the block maps c through its own
    SiLU + Linear(D, nD); with adaln="single" (PixArt) it receives the shared modulation (B, nD)
    and adds its own learned table `scale_shift_table` (n, D). With `cross_attention` a
    cross-attention to the context follows the self-attention as a plain residual (PixArt).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        *,
        swiglu: bool = False,
        rmsnorm: bool = False,
        wo_shift: bool = False,
        adaln: str = "block",
        cross_attention: bool = False,
    ):
        super().__init__()
        self.wo_shift = wo_shift
        self.num_modulations = 4 if wo_shift else 6
        self.norm1 = block_norm(hidden_size, rmsnorm)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, rms_qk_norm=rmsnorm)
        self.cross_attn = CrossAttention(hidden_size, num_heads) if cross_attention else None
        self.norm2 = block_norm(hidden_size, rmsnorm)
        if swiglu:
            self.mlp = SwiGLU(hidden_size, swiglu_hidden_size(hidden_size, mlp_ratio))
        else:
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        if adaln == "block":
            # c -> the block's modulation; zero-initialised (adaLN-Zero) in SiT.initialize_weights.
            self.adaLN_modulation = nn.Sequential(
                nn.SiLU(), nn.Linear(hidden_size, self.num_modulations * hidden_size, bias=True)
            )
        else:
            # PixArt's initialisation: randn / sqrt(D) (the gates are not zero at the start).
            self.scale_shift_table = nn.Parameter(
                torch.randn(self.num_modulations, hidden_size) / hidden_size**0.5
            )

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c: (B, D), or (B, n*D) shared modulation for adaLN-single -> n tensors of (B, D)."""
        if hasattr(self, "adaLN_modulation"):
            return self.adaLN_modulation(c).chunk(self.num_modulations, dim=-1)
        return (c.unflatten(-1, (self.num_modulations, -1)) + self.scale_shift_table).unbind(1)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        rope: nn.Module | None = None,
        context: Context | None = None,
    ) -> torch.Tensor:
        # x: (B, T, D); c: (B, D) or (B, n*D); rope: the model's 2-D RoPE or None;
        # context: the projected context (B, L, D) and its mask, for the cross-attention
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulation(c)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        if self.cross_attn is not None:  # no norm, no modulation, no gate (PixArt)
            x = x + self.cross_attn(x, context)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Norm, adaLN shift/scale, then a linear map from each token to its p*p*C outputs.

    Under adaLN-single the final layer keeps this Linear(D, 2D) modulation of c (2.7M parameters
    at XL). PixArt replaces it with a (2, D) table plus the raw time embedding; keeping it is
    what the published "-31.8%, about 460M" for SiT-XL/2 counts, and keeps the final layer
    zero-initialised as in every other configuration.

    REG (class_token_dim > 0): token 0 is the class token; after the shared norm and modulation
    it goes to its own head `linear_cls` (D -> class_token_dim) and tokens 1.. to `linear`.
    """

    def __init__(
        self,
        hidden_size: int,
        patch_size: int,
        out_channels: int,
        rmsnorm: bool = False,
        class_token_dim: int = 0,
    ):
        super().__init__()
        self.norm_final = block_norm(hidden_size, rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        if class_token_dim:
            self.linear_cls = nn.Linear(hidden_size, class_token_dim, bias=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, T, p*p*C); with a class token: ((B, T - 1, p*p*C) patches, (B, class_token_dim))."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        if not hasattr(self, "linear_cls"):
            return self.linear(x)  # (B, T, p*p*C)
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])


class PrefixSkippingRope(nn.Module):
    """A RoPE (or TREAD's routed one) that leaves the first `prefix` tokens unrotated: REG's class
    token has no grid position. (B, heads, prefix + T, d) -> same."""

    def __init__(self, rope: nn.Module, prefix: int):
        super().__init__()
        self.rope, self.prefix = rope, prefix

    @classmethod
    def wrap(cls, rope: nn.Module | None, prefix: int) -> nn.Module | None:
        return rope if rope is None or prefix == 0 else cls(rope, prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :, : self.prefix], self.rope(x[:, :, self.prefix :])], dim=2)


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class SiTConfig:
    """Everything needed to rebuild a SiT; stored in checkpoints next to the state dict."""

    input_size: int = 32  # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0: no label embedder (text or unconditional models)
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False  # DiT predicts a variance too (2C outputs); SiT/REPA do not
    qk_norm: bool = False
    time_scale: float = 1.0  # 1 for SiT/REPA (raw t); 1000 for DiT's integer timesteps
    # REPA: after block `align_depth` (1-based) the hidden tokens go through one projector per
    # target encoder, of output size `projector_out_dims[k]`. Empty list = plain SiT.
    align_depth: int = 8
    projector_out_dims: list[int] = field(default_factory=list)
    projector_dim: int = 2048
    # REPA-E: a BatchNorm (no affine) that normalises the VAE latents; its running statistics
    # are part of the diffusion model's state (keys `bn.*`).
    latent_batchnorm: bool = False
    # LightningDiT's block options (all on but qk-norm and wo_shift for LightningDiT-*).
    swiglu: bool = False  # SwiGLU FFN (w12, w3) in place of the GELU MLP
    rmsnorm: bool = False  # RMSNorm with a learned scale in place of the affine-free LayerNorms
    rope: bool = False  # 2-D RoPE on q and k (the fixed sin-cos pos_embed is still added)
    wo_shift: bool = False  # adaLN gives scale and gate only (4D instead of 6D per block)
    adaln: str = "block"  # "block": adaLN-Zero per block; "single": PixArt's shared adaLN
    # Recompute each block in the backward pass (training with gradients only; same numbers).
    grad_checkpointing: bool = False
    # Cross-attention to a sequence of embeddings (PixArt): width of the context's tokens (0: off),
    # the longest context (the null context's rows; PixArt's T5 captions: 120) and whether the null
    # context is learned or PixArt's fixed random buffer.
    context_dim: int = 0
    context_length: int = 120
    null_context: str = "learned"
    # TREAD (training only): the fraction r of tokens that skips blocks tread_start..tread_end
    # (0-based, inclusive; None: depth - 4). 0: off.
    tread_ratio: float = 0.0
    tread_start: int = 2
    tread_end: int | None = None
    # Weights trained with t=1 data and v = x - e (LightningDiT's released models): the network is
    # fed 1 - t and its output negated, so forward/velocity keep our convention.
    reverse_time: bool = False
    # DDT (repa/models/ddt.py): blocks 1..k form a condition encoder whose output conditions the
    # remaining blocks, a velocity decoder, per token; 0 (default): a plain SiT.
    ddt_encoder_depth: int = 0
    # REG: width of the encoder class token that enters as token 0 (768 for DINOv2-B); 0: off.
    # Keys cls_projectors2 (Linear(class_token_dim, D)), wg_norm (affine LayerNorm), pos_embed of
    # N + 1 rows (row 0 zeros) and final_layer.linear_cls (D -> class_token_dim), REG's layout.
    class_token_dim: int = 0

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(
                f"latent size {self.input_size} is not divisible by patch size {self.patch_size}; "
                f"valid patch sizes for it: {[p for p in (1, 2, 4, 8) if self.input_size % p == 0]}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.projector_out_dims and not 1 <= self.align_depth <= self.depth:
            raise ValueError(
                f"align depth {self.align_depth} is out of range: it counts blocks from 1 and this model "
                f"has {self.depth}, so choose 1..{self.depth} (REPA uses 8 for L/XL, 4 for B)"
            )
        if self.adaln not in ADALN_MODES:
            raise ValueError(f"--adaln {self.adaln!r} is not one of: {', '.join(ADALN_MODES)}")
        head_dim = self.hidden_size // self.num_heads
        if self.rope and head_dim % 4:
            raise ValueError(
                f"--rope needs a head width divisible by 4, but --hidden-size {self.hidden_size} / "
                f"--num-heads {self.num_heads} gives {head_dim}: change either, or drop --rope"
            )
        self.projector_out_dims = [int(d) for d in self.projector_out_dims]
        if self.ddt_encoder_depth:
            from repa.models.ddt import check_ddt_config

            check_ddt_config(self)
        if self.num_classes < 0:
            raise ValueError(f"--num-classes must be >= 0 (0: no labels), got {self.num_classes}")
        self._check_cross_attention()
        self._check_tread()
        self._check_class_token()

    def _check_class_token(self) -> None:
        if self.class_token_dim < 0:
            raise ValueError(
                f"class_token_dim must be >= 0 (0: no REG class token), got {self.class_token_dim}"
            )
        if self.class_token_dim and self.ddt_encoder_depth:
            raise ValueError(
                "REG's class token (--method reg) is not wired into DDT's condition encoder: use a SiT "
                "model, or another --method"
            )

    def _check_cross_attention(self) -> None:
        if self.context_dim < 0:
            raise ValueError(f"context_dim must be >= 0 (0: no cross-attention), got {self.context_dim}")
        if self.null_context not in NULL_CONTEXT_MODES:
            raise ValueError(
                f"null_context {self.null_context!r} is not one of: {', '.join(NULL_CONTEXT_MODES)}"
            )
        if self.context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {self.context_length}")

    @property
    def tread_blocks(self) -> tuple[int, int]:
        """TREAD's route: first and last routed block, 0-based, inclusive."""
        return self.tread_start, self.depth - 4 if self.tread_end is None else self.tread_end

    def _check_tread(self) -> None:
        if not 0 <= self.tread_ratio < 1:
            raise ValueError(
                f"--tread-ratio {self.tread_ratio} must lie in [0, 1): the fraction of tokens that skips "
                "the route (0: off; TREAD's published value 0.5)"
            )
        if self.tread_ratio == 0:
            return
        start, end = self.tread_blocks
        if not 0 <= start <= end < self.depth:
            default = " (the default --tread-end is depth - 4)" if self.tread_end is None else ""
            raise ValueError(
                f"TREAD route --tread-start {start} .. --tread-end {end}{default} does not fit this model's "
                f"{self.depth} blocks: they are 0-based block indices, both inclusive, so choose "
                f"0 <= start <= end <= {self.depth - 1}"
            )
        if num_kept_tokens(self.num_tokens, self.tread_ratio) < 1:
            raise ValueError(
                f"--tread-ratio {self.tread_ratio} keeps no token of this model's {self.num_tokens}: lower it"
            )

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Grid (patch) tokens; REG's class token comes on top (num_prefix_tokens)."""
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the grid: REG's class token, or none."""
        return 1 if self.class_token_dim else 0


class SiT(nn.Module):
    """Diffusion transformer predicting the flow-matching velocity.

    forward(x, t, y) -> (velocity (B, C, H, W), [projected tokens (B, T, D_k) per encoder]);
    cross-attention models also take context=(B, L, context_dim), context_mask=(B, L).
    REG models (class_token_dim > 0) also take class_token=(B, class_token_dim), the noisy class
    token, and their velocity is the pair (latent velocity, class-token velocity (B, class_token_dim));
    their projections cover [class token; patches] (B, 1 + T, D_k).
    """

    def __init__(self, config: SiTConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden, time_scale=config.time_scale)
        # num_classes=0: no label embedder (a text model conditions through the context only)
        self.y_embedder = (
            LabelEmbedder(config.num_classes, hidden, config.class_dropout_prob)
            if config.num_classes
            else None
        )
        if config.context_dim:
            self.context_embedder = ContextEmbedder(
                config.context_dim, hidden, config.context_length, config.null_context
            )
        if config.class_token_dim:  # REG: the noisy class token -> token 0
            self.cls_projectors2 = nn.Linear(config.class_token_dim, hidden, bias=True)
            self.wg_norm = nn.LayerNorm(hidden, elementwise_affine=True, eps=1e-6)
        # Fixed sin-cos embedding, stored as a frozen Parameter as in the published checkpoints
        # (REG: a row of zeros first, for the class token).
        self.pos_embed = nn.Parameter(
            torch.zeros(1, config.num_prefix_tokens + config.num_tokens, hidden), requires_grad=False
        )
        # 2-D RoPE tables for this grid, shared by every block's attention (not saved).
        self.feat_rope = (
            RotaryEmbedding2D(hidden // config.num_heads, config.grid_size) if config.rope else None
        )
        block_options = dict(
            swiglu=config.swiglu,
            rmsnorm=config.rmsnorm,
            wo_shift=config.wo_shift,
            adaln=config.adaln,
            cross_attention=config.context_dim > 0,
        )
        self.blocks = nn.ModuleList(
            [
                SiTBlock(hidden, config.num_heads, config.mlp_ratio, config.qk_norm, **block_options)
                for _ in range(config.depth)
            ]
        )
        if config.adaln == "single":
            # PixArt's `t_block`: c -> the modulation every block shares (each adds its own table).
            self.t_block = nn.Sequential(
                nn.SiLU(), nn.Linear(hidden, self.blocks[0].num_modulations * hidden, bias=True)
            )
        self.projectors = nn.ModuleList(
            [build_projector(hidden, config.projector_dim, dim) for dim in config.projector_out_dims]
        )
        self.final_layer = FinalLayer(
            hidden, config.patch_size, config.out_channels, config.rmsnorm, config.class_token_dim
        )
        if config.latent_batchnorm:
            self.bn = nn.BatchNorm2d(config.in_channels, eps=1e-4, momentum=0.1, affine=False)
        self.initialize_weights()

    @property
    def null_label(self) -> int:
        """The label index of the unconditional (null) class."""
        return self.config.num_classes

    def set_null_context(self, embeddings: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """null_context="empty" (REPA's): the text encoder's embedding of the empty caption
        (L, context_dim) and its mask (L,), the shards' null_text.npy; kept in the state dict."""
        if not self.config.context_dim:
            raise ValueError("this model has no cross-attention (context_dim=0): it takes no null caption")
        self.context_embedder.set_null_context(embeddings, mask)

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, zero adaLN outputs and final layer (adaLN-Zero).

        adaLN-single follows PixArt instead: its shared MLP's output layer is N(0, 0.02) and the
        per-block tables randn / sqrt(D), so the blocks are live from the start; the final layer
        is zero either way, so every model predicts zero velocity at initialisation. The
        cross-attention's output layer starts at zero (PixArt), so a text model starts text-blind.
        """

        def init_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(init_linear)
        pos_embed = sincos_pos_embed_2d(self.config.hidden_size, self.config.grid_size)
        self.pos_embed.data.zero_()  # REG's row 0 stays zero
        self.pos_embed.data[0, self.config.num_prefix_tokens :].copy_(torch.from_numpy(pos_embed))
        # The patch conv is initialised like a linear layer on its flattened kernel.
        weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.config.context_dim:  # PixArt: caption projection N(0, 0.02), attention output zero
            nn.init.normal_(self.context_embedder.fc1.weight, std=0.02)
            nn.init.normal_(self.context_embedder.fc2.weight, std=0.02)
            for block in self.blocks:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.config.adaln == "single":
            nn.init.normal_(self.t_block[-1].weight, std=0.02)
        else:  # Zero-out adaLN modulation: every block starts as the identity.
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.config.class_token_dim:  # REG: zero-initialised class-token head
            nn.init.zeros_(self.final_layer.linear_cls.weight)
            nn.init.zeros_(self.final_layer.linear_cls.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W); per token the order is (p_row, p_col, channel)."""
        p, grid, channels = self.config.patch_size, self.config.grid_size, self.config.out_channels
        return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=grid, p=p, q=p, c=channels)

    def _check_input(self, x: torch.Tensor) -> None:
        c = self.config
        if (
            x.ndim != 4
            or x.shape[1] != c.in_channels
            or x.shape[2] != c.input_size
            or x.shape[3] != c.input_size
        ):
            raise ValueError(
                f"expected latents of shape (B, {c.in_channels}, {c.input_size}, {c.input_size}), "
                f"got {tuple(x.shape)}"
            )

    def _embed(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        force_drop_ids: torch.Tensor | None = None,
        class_token: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        if self.config.reverse_time:
            t = 1 - t
        tokens = self.x_embedder(x)  # (B, T, D)
        if self.config.class_token_dim:  # REG: [class token; patches] (B, 1 + T, D)
            prefix = self.wg_norm(self.cls_projectors2(self._checked_class_token(x, class_token)))
            tokens = torch.cat([prefix.unsqueeze(1).to(tokens.dtype), tokens], dim=1)
        elif class_token is not None:
            raise ValueError(
                "this model has no class token (class_token_dim=0, not a REG model): pass class_token=None"
            )
        tokens = tokens + self.pos_embed
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this model is class-conditional (num_classes > 0): pass the labels y")
            c = c + self.y_embedder(y, train=self.training, force_drop_ids=force_drop_ids)
        elif y is not None:
            raise ValueError("this model has no label embedder (num_classes=0): pass y=None")
        return tokens, c

    def _checked_class_token(self, x: torch.Tensor, class_token: torch.Tensor | None) -> torch.Tensor:
        width = self.config.class_token_dim
        if class_token is None:
            raise ValueError(
                f"this is a REG model: pass class_token=(B, {width}), the noisy class token (samplers "
                "integrate it through repa.eval.sample's ClassTokenSampling, never from an encoder)"
            )
        if tuple(class_token.shape) != (x.shape[0], width):
            raise ValueError(
                f"class_token must have shape {(x.shape[0], width)}, got {tuple(class_token.shape)}"
            )
        return class_token

    def _embed_context(
        self,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        force_drop_ids: torch.Tensor | None,
    ) -> Context | None:
        """The projected context for the cross-attention, or None for models without it.
        force_drop_ids: (B,) bool, the samples whose context becomes the null context."""
        if not self.config.context_dim:
            if context is not None or context_mask is not None:
                raise ValueError(
                    "this model has no cross-attention (context_dim=0): build it with context_dim set to "
                    "the context's width to condition on context"
                )
            return None
        if context is None:
            raise ValueError(
                f"this model cross-attends to a context (context_dim={self.config.context_dim}): pass "
                "context=(B, L, context_dim) [and context_mask=(B, L)]"
            )
        return self.context_embedder(context, context_mask, force_drop_ids)

    def _condition_drop(self, x: torch.Tensor, force_drop_ids: torch.Tensor | None) -> torch.Tensor | None:
        """force_drop_ids, or for a cross-attention model in train mode without it, the model's own
        draw (probability class_dropout_prob), made once so that label and context drop together.
        Label-only models keep the label embedder's own draw."""
        config = self.config
        if force_drop_ids is None and config.context_dim and self.training and config.class_dropout_prob > 0:
            return torch.rand(x.shape[0], device=x.device) < config.class_dropout_prob
        return force_drop_ids

    def _route(self, route_ids: torch.Tensor | None, batch: int, device: torch.device) -> TokenRoute | None:
        """TREAD's route for this pass: in train mode with tread_ratio > 0 only, else None.
        route_ids: (B, T) one permutation per sample (the method's draw), else the model draws."""
        config = self.config
        if not (self.training and config.tread_ratio > 0):
            return None
        if route_ids is None:
            route_ids = random_route_ids(batch, config.num_tokens, device)
        elif tuple(route_ids.shape) != (batch, config.num_tokens):
            raise ValueError(
                f"route_ids must hold one permutation of the {config.num_tokens} tokens per sample, "
                f"shape {(batch, config.num_tokens)}; got {tuple(route_ids.shape)}"
            )
        start, end = config.tread_blocks
        return TokenRoute(start, end, route_ids, num_kept_tokens(config.num_tokens, config.tread_ratio))

    def _block_condition(self, c: torch.Tensor) -> torch.Tensor:
        """What the blocks receive: c itself, or under adaLN-single the shared modulation (B, n*D)."""
        return self.t_block(c) if self.config.adaln == "single" else c

    def _run_block(
        self,
        block: SiTBlock,
        tokens: torch.Tensor,
        c: torch.Tensor,
        rope: nn.Module | None,
        context: Context | None,
    ) -> torch.Tensor:
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            # Keeps only the block's input; its activations are recomputed in the backward pass.
            return checkpoint(block, tokens, c, rope, context, use_reentrant=False)
        return block(tokens, c, rope, context)

    def _run_blocks(
        self,
        tokens: torch.Tensor,
        block_c: torch.Tensor,
        context: Context | None,
        route: TokenRoute | None = None,
        tap: bool = False,
        align_only: bool = False,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The blocks, in order: (tokens (B, T, D), projections). tap: apply the REPA projectors
        after block align_depth; align_only: stop there and return (None, projections). With a
        TREAD route, blocks route.start..route.end see only the kept tokens (B, K, D), the REPA tap
        included when it lies inside (its projections are then of the kept tokens). REG's class
        token (token 0) is always kept and gets no RoPE rotation."""
        prefix = self.config.num_prefix_tokens  # REG's class token: always kept, never rotated
        rope = PrefixSkippingRope.wrap(self.feat_rope, prefix)
        projections: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            if route is not None and index == route.start:
                # (B, K, D), after the prefix tokens; TREAD routes grid tokens only
                tokens = torch.cat([tokens[:, :prefix], route.leave(tokens[:, prefix:])], dim=1)
                rope = PrefixSkippingRope.wrap(route.rope(self.feat_rope), prefix)
            tokens = self._run_block(block, tokens, block_c, rope, context)
            if route is not None and index == route.end:
                # (B, T, D): skipped tokens at their pre-route values
                tokens = torch.cat([tokens[:, :prefix], route.rejoin(tokens[:, prefix:])], dim=1)
                rope = PrefixSkippingRope.wrap(self.feat_rope, prefix)
            if tap and index + 1 == self.config.align_depth:
                projections = [projector(tokens) for projector in self.projectors]  # each (B, T or K, D_k)
                if align_only:
                    return None, projections
        return tokens, projections

    def _output(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor | ClassTokenVelocity:
        """(B, C_out, H, W); REG: the pair (that, class-token velocity (B, class_token_dim))."""
        out = self.final_layer(tokens, c)
        patches, class_velocity = out if self.config.class_token_dim else (out, None)
        velocity = self.unpatchify(patches)  # (B, C_out, H, W)
        if self.config.reverse_time:  # v_ours = -v_theirs (a learned variance keeps its sign)
            channels = self.config.in_channels
            velocity = torch.cat([-velocity[:, :channels], velocity[:, channels:]], dim=1)
            class_velocity = None if class_velocity is None else -class_velocity
        return velocity if class_velocity is None else (velocity, class_velocity)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        *,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        align_only: bool = False,
        force_drop_ids: torch.Tensor | None = None,
        route_ids: torch.Tensor | None = None,
        class_token: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | ClassTokenVelocity | None, list[torch.Tensor]]:
        """Velocity and projected alignment tokens.

        x: (B, C, H, W) noisy latents; t: (B,) times in [0, 1]; y: (B,) int64 labels, or None
        for a model without labels (num_classes=0).
        context: (B, L, context_dim) embeddings to cross-attend to (models with context_dim);
        context_mask: (B, L) bool, True (or 1) = a real token, False = padding.
        align_only: run only the blocks up to the alignment tap and return (None, projections);
        REPA-E's VAE step needs nothing else, and skipping the rest saves most of the pass.
        force_drop_ids: (B,) bool, labels replaced by the null class and contexts by the null
        context (classifier-free guidance training), in place of the model's own draw in train mode.
        route_ids: (B, T) int64, one permutation of the tokens per sample for TREAD (train mode
        with tread_ratio > 0; the model draws its own when None). With the REPA tap inside the
        route, the projections are of the kept tokens: (B, K, D_k), K = (1 - r) T, in the order
        route_ids[:, :K] (gather the targets with repa.models.tread.gather_tokens).
        class_token: (B, class_token_dim), REG's noisy class token (REG models only, required);
        the velocity is then the pair (latent velocity, class-token velocity) and the projections
        cover [class token; patches] (B, 1 + T or 1 + K, D_k): REG's token is always kept.
        """
        if align_only and not len(self.projectors):
            raise ValueError("align_only=True needs a model with projectors (projector_out_dims is empty)")
        force_drop_ids = self._condition_drop(x, force_drop_ids)
        tokens, c = self._embed(x, t, y, force_drop_ids, class_token)
        context_tokens = self._embed_context(context, context_mask, force_drop_ids)
        route = self._route(route_ids, x.shape[0], x.device)
        tokens, projections = self._run_blocks(
            tokens,
            self._block_condition(c),
            context_tokens,
            route,
            tap=len(self.projectors) > 0,
            align_only=align_only,
        )
        if align_only:
            return None, projections
        return self._output(tokens, c), projections

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        *,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
        class_token: torch.Tensor | None = None,
    ) -> torch.Tensor | ClassTokenVelocity:
        """The sampler's view: velocity only; the projectors are never evaluated and TREAD never
        routes. force_drop_ids: (B,) bool, the rows to predict unconditionally (null label and
        null context); cross-attention models sample through cross_attention.CaptionVelocity.
        REG models take the noisy class_token and return the pair (latent velocity, class-token
        velocity); the samplers integrate both through repa.eval.sample.ClassTokenSampling."""
        force_drop_ids = self._condition_drop(x, force_drop_ids)
        tokens, c = self._embed(x, t, y, force_drop_ids, class_token)
        context_tokens = self._embed_context(context, context_mask, force_drop_ids)
        tokens, _ = self._run_blocks(tokens, self._block_condition(c), context_tokens)
        velocity = self._output(tokens, c)
        velocity, class_velocity = velocity if self.config.class_token_dim else (velocity, None)
        if self.config.learn_sigma:
            velocity = velocity[:, : self.config.in_channels]
        return velocity if class_velocity is None else (velocity, class_velocity)

    # --- REPA-E latent normalisation (only when config.latent_batchnorm) ---

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean VAE latents -> the SiT's data space. In train mode this updates the running stats."""
        return self.bn(latents)

    def denormalize_latents(self, normalized: torch.Tensor) -> torch.Tensor:
        """Inverse of normalize_latents with the running statistics (for decoding samples)."""
        mean = self.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.bn.eps)
        return normalized * std + mean


# ----------------------------------------------------------------------------------------------
# Weight adapters for published checkpoints


def unwrap_checkpoint(checkpoint: Mapping, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """The model state dict inside a published checkpoint file.

    REPA saves {"model", "ema", "opt", "args"}; REPA-E adds the VAE; exported files are bare
    state dicts. `prefer` picks "ema" (what the papers evaluate) or "model".
    """
    for key in (prefer, "ema", "model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    return dict(checkpoint)


def convert_legacy_state_dict(
    state_dict: Mapping[str, torch.Tensor], align_depth: int
) -> dict[str, torch.Tensor]:
    """Map old REPA names `decoder_blocks.i.*` to `blocks.(i + align_depth).*`; other keys pass through.

    Also strips a DDP `module.` prefix (checkpoints saved without unwrapping the model).
    """
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("decoder_blocks."):
            index, rest = key[len("decoder_blocks.") :].split(".", 1)
            key = f"blocks.{int(index) + align_depth}.{rest}"
        converted[key] = value
    return converted


# Keys that name an option, for the hint under a strict-load error.
_OPTION_KEYS = {
    ".mlp.w12.": "swiglu (--swiglu)",
    ".norm1.weight": "rmsnorm (--rmsnorm)",
    "feat_rope.": "rope (--rope)",
    "t_block.": 'adaln="single" (--adaln single)',
    ".attn.q_norm.": "qk_norm (--qk-norm)",
    "bn.running_mean": "latent_batchnorm (REPA-E)",
}


def _fixed_tables_for(model: SiT, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with its fixed tables made to fit `model`.

    - RoPE tables (`feat_rope.freqs_cos` / `freqs_sin`, saved by LightningDiT): dropped when the
      model has RoPE, after checking that, on the same grid, they are ours (else the rotations
      the weights learned with differ, and the load is refused). Without RoPE they stay and are
      reported as unexpected.
    - `pos_embed` of another grid: the fixed sin-cos table of that grid is replaced by the model's
      own, so weights trained at one resolution load at another. Any other content stays and is
      reported as a shape mismatch.
    Meta tensors (shape-only models) are never compared.
    """
    state_dict = dict(state_dict)
    if model.feat_rope is not None:
        for key in [k for k in state_dict if k.startswith("feat_rope.")]:
            theirs, ours = state_dict.pop(key), getattr(model.feat_rope, key.split(".", 1)[1], None)
            if (
                ours is not None
                and theirs.shape == ours.shape
                and not (theirs.is_meta or ours.is_meta)
                and not torch.allclose(theirs.float().cpu(), ours.float().cpu(), atol=1e-4)
            ):
                raise ValueError(
                    f"the checkpoint's RoPE table {key} differs from this model's: the weights were "
                    "trained with another RoPE layout or theta (repa/models/rope.py)"
                )
    theirs, ours = state_dict.get("pos_embed"), model.pos_embed
    if (
        theirs is not None
        and theirs.shape != ours.shape
        and theirs.ndim == 3
        and theirs.shape[-1] == ours.shape[-1]
        and not (theirs.is_meta or ours.is_meta)
    ):
        grid = round(theirs.shape[1] ** 0.5)
        if grid * grid == theirs.shape[1] and ours.shape[-1] % 4 == 0:
            table = torch.from_numpy(sincos_pos_embed_2d(ours.shape[-1], grid))
            if torch.allclose(theirs[0].float().cpu(), table, atol=1e-5):
                state_dict["pos_embed"] = ours.detach().clone()
    return state_dict


def load_state_dict_strict(model: SiT, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load with strict key and shape checking and a message that lists what differs.

    Fixed tables that depend only on the grid (RoPE's, and pos_embed of another resolution) are
    rebuilt for the model rather than read (`_fixed_tables_for`).
    """
    expected = model.state_dict()
    state_dict = convert_legacy_state_dict(state_dict, model.config.align_depth)
    state_dict = _fixed_tables_for(model, state_dict)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        lines = ["checkpoint does not match the model:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", wrong_shape),
        ):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        for title, items in (("checkpoint", unexpected), ("model", missing)):
            options = sorted({o for part, o in _OPTION_KEYS.items() for k in items if part in k})
            if options:
                lines.append(f"  the {title} has keys of option(s) {', '.join(options)} that the other lacks")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------------------------
# Size registry

# name -> (depth, hidden size, heads), docs/conventions.md "SiT sizes"
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (1, 2, 4, 8)
# LightningDiT's registry adds 1.0B and 1.6B sizes; it registers patch sizes 1 and 2.
LIGHTNINGDIT_SIZES: dict[str, tuple[int, int, int]] = {
    "B": SIZES["B"],
    "L": SIZES["L"],
    "XL": SIZES["XL"],
    "1p0B": (24, 1536, 24),
    "1p6B": (28, 1792, 28),
}
LIGHTNINGDIT_PATCH_SIZES = (1, 2)
# family -> (sizes, patch sizes, SiTConfig defaults)
_FAMILIES: dict[str, tuple[dict, tuple[int, ...], dict]] = {
    # SiT as trained by REPA: raw t, velocity only.
    "SiT": (SIZES, PATCH_SIZES, {}),
    # DiT as in its paper: t scaled to [0, 1000), learned variance (2C outputs). Kept for
    # `repa flops` comparisons with the DiT paper's table.
    "DiT": (SIZES, PATCH_SIZES, {"learn_sigma": True, "time_scale": 1000.0}),
    # LightningDiT's released block: SwiGLU, RMSNorm, 2-D RoPE (qk-norm and wo_shift off).
    "LightningDiT": (
        LIGHTNINGDIT_SIZES,
        LIGHTNINGDIT_PATCH_SIZES,
        {"swiglu": True, "rmsnorm": True, "rope": True},
    ),
}
# name -> SiTConfig defaults; models are built by create_model(name, **overrides).
MODELS: dict[str, dict] = {}


def register_model(name: str, **defaults) -> None:
    """Add a named configuration (a new size, a new family) to the registry."""
    MODELS[name] = defaults


for _family, (_sizes, _patches, _family_defaults) in _FAMILIES.items():
    for _size, (_depth, _hidden, _heads) in _sizes.items():
        for _patch in _patches:
            register_model(
                f"{_family}-{_size}/{_patch}",
                depth=_depth,
                hidden_size=_hidden,
                num_heads=_heads,
                patch_size=_patch,
                **_family_defaults,
            )


# DDT (repa/models/ddt.py): DDT's block on the SiT sizes, blocks 1..k the condition encoder. XL's
# 22 of 28 is the released DDT-XL/2 (22en6de); B's 8 of 12 and L's 20 of 24 are the DDT paper's.
DDT_ENCODER_DEPTHS = {"B": 8, "L": 20, "XL": 22}
for _size, _encoder_depth in DDT_ENCODER_DEPTHS.items():
    for _patch in (1, 2):
        _depth, _hidden, _heads = SIZES[_size]
        register_model(f"DDT-{_size}/{_patch}", depth=_depth, hidden_size=_hidden, num_heads=_heads,
                       patch_size=_patch, ddt_encoder_depth=_encoder_depth, swiglu=True, rmsnorm=True,
                       rope=True, qk_norm=True)  # fmt: skip


def list_models() -> list[str]:
    return list(MODELS)


def config_for(name: str, **overrides) -> SiTConfig:
    """The validated configuration of a registered model, without building its weights."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    unknown = set(overrides) - set(SiTConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown model option(s) {sorted(unknown)}; valid: {sorted(SiTConfig.__dataclass_fields__)}"
        )
    return SiTConfig(**{**MODELS[name], **overrides})


def create_model(name: str, **overrides) -> SiT:
    """Build a registered model, e.g. create_model("SiT-XL/2", projector_out_dims=[768]).

    Overrides are SiTConfig fields (input_size, in_channels, num_classes, align_depth, ...).
    """
    config = config_for(name, **overrides)
    if config.ddt_encoder_depth:
        from repa.models.ddt import DDT

        return DDT(config)
    return SiT(config)
