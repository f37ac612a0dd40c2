"""DDT: the decoupled diffusion transformer (Wang et al., arXiv 2504.05741), in its released layout.

One stack of `depth` blocks split in two (SiTConfig.ddt_encoder_depth = k):
  condition encoder   blocks 1..k on s0 = s_embedder(patches), conditioned per sample on
                      c = SiLU(t_emb + y_emb) (B, 1, D); its output s gives the self-condition
                      z = SiLU(t_emb + s)                                          (B, T, D)
  velocity decoder    blocks k+1..depth on h0 = x_embedder(patches) (a second embedding of the
                      same noisy input), conditioned per token on z; the final layer too.
The class label reaches the decoder only through z. At sampling time z may be computed every
few steps and reused in between (repa/models/ddt_sharing.py): only the decoder then runs.

The block is DDT's, fixed (so its weights load): RMSNorm pre-norms, attention without qkv bias,
RMS qk-norm, DDT's 2-D RoPE (positions spread over [0, 16] on each axis, column and row angles
alternating over channel pairs), a SwiGLU of three bias-free matrices `w1, w3, w2`, and adaLN =
Linear(D, 6D) without an internal SiLU (the SiLU is in c and z), keys `adaLN_modulation.0.*`.
Patches are `F.unfold` + Linear, features ordered (channel, row, col); no absolute position
embedding. Time features use max period 10. Only the embeddings and the final layer are
initialised explicitly (final layer zero); block layers keep PyTorch's defaults (no adaLN-Zero).

REPA: the tap (`align_depth`) lies inside the encoder (DDT aligns after block 8 of 22), so the
projectors see encoder tokens and never run when the sampler reuses z.

Time convention: ours (t=0 data, t=1 noise), the network sees the raw t. `reverse_time` wraps the
released weights, trained the other way: it feeds 1 - t and negates the velocity.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from repa.models.layers import (
    Attention,
    LabelEmbedder,
    RMSNorm,
    TimestepEmbedder,
    build_projector,
)
from repa.models.rope import ROPE_THETA, rotate_pairs
from repa.models.sit import SiT, SiTConfig

# DDT spreads the token positions of every grid over [0, DDT_ROPE_SPAN] on each axis.
DDT_ROPE_SPAN = 16.0
# DDT's sinusoidal time features: max period 10 (SiT's is 10000) on the raw t in [0, 1].
DDT_TIME_MAX_PERIOD = 10.0


def check_ddt_config(config: SiTConfig) -> None:
    """The options a DDT accepts (called by SiTConfig when ddt_encoder_depth > 0)."""
    k, depth = config.ddt_encoder_depth, config.depth
    if not 0 < k < depth:
        raise ValueError(
            f"--ddt-encoder-depth {k} must leave at least one decoder block: choose 1..{depth - 1} "
            f"for a model of {depth} blocks (DDT-XL/2 uses 22 of 28)"
        )
    if config.projector_out_dims and config.align_depth > k:
        raise ValueError(
            f"the REPA tap (--align-depth {config.align_depth}) must lie inside the DDT condition "
            f"encoder (--ddt-encoder-depth {k}): the sampler reuses the encoder's output, and DDT "
            f"aligns after block 8"
        )
    fixed = {"swiglu": "--swiglu", "rmsnorm": "--rmsnorm", "rope": "--rope"}
    off = [flag for name, flag in fixed.items() if not getattr(config, name)]
    if off:
        raise ValueError(
            f"DDT's block always has SwiGLU, RMSNorm and its own 2-D RoPE, but {', '.join(off)} "
            "are off: use a DDT-* model (e.g. --model DDT-XL/2), turn them on, or drop --ddt-encoder-depth"
        )
    unsupported = {
        "adaln": (config.adaln != "block", "--adaln single"),
        "wo_shift": (config.wo_shift, "--wo-shift"),
        "learn_sigma": (config.learn_sigma, "learn_sigma"),
        "time_scale": (config.time_scale != 1.0, "time_scale != 1"),
    }
    bad = [flag for on, flag in unsupported.values() if on]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} cannot be combined with --ddt-encoder-depth: DDT's blocks take a "
            "per-token adaLN condition of 6 x D, and its velocity has C channels"
        )
    # Options of the plain SiT added later (cross-attention, token routing) are not part of DDT.
    for name, default in (("context_dim", 0), ("tread_ratio", 0.0)):
        if getattr(config, name, default) not in (default, None):
            raise ValueError(f"SiTConfig.{name} cannot be combined with --ddt-encoder-depth (DDT)")


# ----------------------------------------------------------------------------------------------
# Layers


def ddt_rope_angles(head_dim: int, grid_size: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """(grid_size**2, head_dim) float32 rotation angles of DDT's 2-D RoPE; tokens row-major.

    Channel pair j (channels 2j, 2j+1) uses frequency f_{j//2} = theta^(-4 (j//2) / head_dim) and
    the token's column position for even j, its row position for odd j; positions are
    linspace(0, 16, grid_size) on both axes, whatever the grid (DDT's `precompute_freqs_cis_2d`).
    """
    if head_dim % 4:
        raise ValueError(f"DDT's 2-D RoPE needs a head width divisible by 4, got {head_dim}")
    freqs = theta ** (-torch.arange(0, head_dim, 4, dtype=torch.float32)[: head_dim // 4] / head_dim)
    positions = torch.linspace(0, DDT_ROPE_SPAN, grid_size)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")
    col_angles = cols.reshape(-1, 1) * freqs  # (T, d/4), computed in float32 as DDT does
    row_angles = rows.reshape(-1, 1) * freqs
    pair_angles = torch.stack([col_angles, row_angles], dim=-1).flatten(1)  # (T, d/2): col, row, ...
    return pair_angles.repeat_interleave(2, dim=-1)  # (T, d): both channels of a pair


class DDTRotaryEmbedding(nn.Module):
    """Rotates (B, heads, T, head_dim) queries or keys: pair (a, b) -> (a cos - b sin, b cos + a sin)."""

    def __init__(self, head_dim: int, grid_size: int):
        super().__init__()
        angles = ddt_rope_angles(head_dim, grid_size)
        # Not persistent: rebuilt for the model's grid (DDT's files carry no tables either).
        self.register_buffer("freqs_cos", angles.cos(), persistent=False)  # (T, head_dim)
        self.register_buffer("freqs_sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 (the tables' precision), returned in x's dtype, as DDT's complex product.
        return (x * self.freqs_cos + rotate_pairs(x) * self.freqs_sin).to(x.dtype)


def ddt_ffn_hidden_size(dim: int, mlp_ratio: float = 4.0) -> int:
    """DDT's SwiGLU width: int(2 * int(D * mlp_ratio) / 3); 1152 -> 3072."""
    return int(2 * int(dim * mlp_ratio) / 3)


class DDTSwiGLU(nn.Module):
    """x -> w2(SiLU(w1 x) * w3 x), three bias-free matrices (not LightningDiT's fused w12/w3)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PatchLinear(nn.Module):
    """Unfolded patches (B, T, C*p*p) -> tokens (B, T, D); key `proj` (DDT's `Embed`)."""

    def __init__(self, patch_features: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(patch_features, hidden_size, bias=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class DDTTimestepEmbedder(TimestepEmbedder):
    """SiT's time MLP (keys `mlp.0`, `mlp.2`) on sinusoidal features of max period 10."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.sinusoidal_features(t, self.frequency_size, max_period=DDT_TIME_MAX_PERIOD)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def modulate_tokens(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN with a condition per token or per sample: shift, scale (B, T or 1, D) like x (B, T, D)."""
    return x * (1 + scale) + shift


class DDTBlock(nn.Module):
    """DDT's block: adaLN (shift, scale, gate) x 2 from a condition that is already SiLU'd."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=False, qk_norm=qk_norm, rms_qk_norm=True)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = DDTSwiGLU(hidden_size, ddt_ffn_hidden_size(hidden_size, mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: nn.Module) -> torch.Tensor:
        # x: (B, T, D); c: (B, 1, D) in the encoder, (B, T, D) in the decoder
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, -1)
        x = x + gate_msa * self.attn(modulate_tokens(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp * self.mlp(modulate_tokens(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DDTFinalLayer(nn.Module):
    """Affine-free LayerNorm, per-token adaLN shift/scale from z, Linear to p*p*C per token."""

    def __init__(self, hidden_size: int, patch_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_features, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(z).chunk(2, dim=-1)
        return self.linear(modulate_tokens(self.norm_final(x), shift, scale))  # (B, T, C*p*p)


# ----------------------------------------------------------------------------------------------
# The model


class DDT(nn.Module):
    """Condition encoder + velocity decoder with SiT's interface.

    forward(x, t, y) -> (velocity (B, C, H, W), [projected encoder tokens (B, T, D_k)]);
    velocity(x, t, y) = decode(x, encode(x, t, y)); encode/decode let a sampler reuse z.
    """

    def __init__(self, config: SiTConfig):
        super().__init__()
        if not config.ddt_encoder_depth:
            raise ValueError("a DDT needs ddt_encoder_depth > 0 (--ddt-encoder-depth)")
        check_ddt_config(config)
        self.config = config
        hidden, patch_features = config.hidden_size, config.in_channels * config.patch_size**2
        self.x_embedder = PatchLinear(patch_features, hidden)
        self.s_embedder = PatchLinear(patch_features, hidden)
        self.t_embedder = DDTTimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(config.num_classes, hidden, config.class_dropout_prob)
        # DDT has no absolute position embedding: positions enter through RoPE only. (The names
        # let SiT's strict loader, which rebuilds fixed tables, treat both models alike.)
        self.pos_embed = None
        self.feat_rope = DDTRotaryEmbedding(hidden // config.num_heads, config.grid_size)
        self.blocks = nn.ModuleList(
            [
                DDTBlock(hidden, config.num_heads, config.mlp_ratio, config.qk_norm)
                for _ in range(config.depth)
            ]
        )
        self.projectors = nn.ModuleList(
            [build_projector(hidden, config.projector_dim, dim) for dim in config.projector_out_dims]
        )
        self.final_layer = DDTFinalLayer(hidden, patch_features)
        if config.latent_batchnorm:  # REPA-E's latent normalisation, as in SiT
            self.bn = nn.BatchNorm2d(config.in_channels, eps=1e-4, momentum=0.1, affine=False)
        self.initialize_weights()

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    @property
    def encoder_blocks(self) -> nn.ModuleList:
        return self.blocks[: self.config.ddt_encoder_depth]

    @property
    def decoder_blocks(self) -> nn.ModuleList:
        return self.blocks[self.config.ddt_encoder_depth :]

    def initialize_weights(self) -> None:
        """DDT's: embeddings xavier / N(0, 0.02), final layer zero, block layers PyTorch's default.

        Projectors (REPA's, not part of DDT's denoiser) get xavier linears as in SiT.
        """
        for embedder in (self.x_embedder, self.s_embedder):
            nn.init.xavier_uniform_(embedder.proj.weight)
            nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in self.projectors.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # --- pieces ---

    _check_input = SiT._check_input

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, C*p*p), features ordered (channel, row, col) as F.unfold gives."""
        self._check_input(x)
        p = self.config.patch_size
        return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, C*p*p) -> (B, C, H, W), the inverse of _patches."""
        size, p = self.config.input_size, self.config.patch_size
        return F.fold(tokens.transpose(1, 2), (size, size), kernel_size=p, stride=p)

    def _run_block(self, block: DDTBlock, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, tokens, c, self.feat_rope, use_reentrant=False)
        return block(tokens, c, self.feat_rope)

    def _encode(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None,
        *,
        tap: bool,
        align_only: bool = False,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(z, projections); tap: evaluate the projectors at align_depth."""
        if self.config.reverse_time:
            t = 1 - t
        t_emb = self.t_embedder(t).unsqueeze(1)  # (B, 1, D)
        y_emb = self.y_embedder(y, train=self.training, force_drop_ids=force_drop_ids).unsqueeze(1)
        c = F.silu(t_emb + y_emb)  # (B, 1, D): one condition per sample
        tokens = self.s_embedder(self._patches(x))  # (B, T, D)
        projections: list[torch.Tensor] = []
        for depth, block in enumerate(self.encoder_blocks, start=1):
            tokens = self._run_block(block, tokens, c)
            if tap and depth == self.config.align_depth and len(self.projectors):
                projections = [projector(tokens) for projector in self.projectors]  # each (B, T, D_k)
                if align_only:
                    return None, projections
        if align_only:
            raise ValueError("align_only=True needs a model with projectors (projector_out_dims is empty)")
        return F.silu(t_emb + tokens), projections  # z: (B, T, D), one condition per token

    def encode(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The self-condition z (B, T, D) of the condition encoder; the projectors do not run."""
        return self._encode(x, t, y, None, tap=False)[0]

    def decode(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Velocity (B, C, H, W) of the decoder for noisy x under the self-condition z (B, T, D).

        z may come from an earlier, nearby time (encoder sharing): the decoder sees t only through z.
        """
        tokens = self.x_embedder(self._patches(x))  # (B, T, D): the decoder's own embedding
        for block in self.decoder_blocks:
            tokens = self._run_block(block, tokens, z)
        velocity = self._unpatchify(self.final_layer(tokens, z))
        return -velocity if self.config.reverse_time else velocity

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        *,
        align_only: bool = False,
        force_drop_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """As SiT.forward: x (B, C, H, W), t (B,) in [0, 1], y (B,) int64 -> (velocity, projections).

        align_only: stop at the tap (inside the encoder) and return (None, projections).
        """
        z, projections = self._encode(x, t, y, force_drop_ids, tap=True, align_only=align_only)
        if align_only:
            return None, projections
        return self.decode(x, z), projections

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sampler's view: velocity only, the projectors never evaluated."""
        return self.decode(x, self.encode(x, t, y))

    # REPA-E latent normalisation (config.latent_batchnorm), shared with SiT.
    normalize_latents = SiT.normalize_latents
    denormalize_latents = SiT.denormalize_latents


# ----------------------------------------------------------------------------------------------
# Published checkpoints


def from_lightning_layout(state_dict: Mapping[str, torch.Tensor], prefer: str = "ema") -> dict:
    """The model state dict inside DDT's Lightning checkpoint; other state dicts pass through.

    DDT saves `denoiser.*`, `ema_denoiser.*` (the EMA weights it samples with) and the REPA
    projector as `diffusion_trainer.proj.0.*`, which becomes our `projectors.0.*`.
    prefer: "ema" or "model" (the raw `denoiser.*`).
    """
    prefixes = ("ema_denoiser.", "denoiser.") if prefer == "ema" else ("denoiser.", "ema_denoiser.")
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in state_dict)), None)
    if prefix is None:
        return dict(state_dict)
    converted = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    projector = "diffusion_trainer.proj.0."
    converted.update(
        {f"projectors.0.{k[len(projector) :]}": v for k, v in state_dict.items() if k.startswith(projector)}
    )
    return converted


# Latent channel counts of the tokenizers we know (pixels, SD-VAE, f16d16, f16d32).
_KNOWN_LATENT_CHANNELS = (3, 4, 16, 32)


def infer_ddt_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """SiTConfig fields that a DDT state dict's shapes and key names determine.

    - heads: from the qk-norm width (head_dim);
    - patch size and channels: the weights give only C * p^2; the first of p = 2, 1 whose C is a
      known latent width (3, 4, 16, 32) is taken (DDT-XL/2: 16 = 4 channels x 2 x 2);
    - grid: not in the weights (RoPE only), so input_size is left out: the tokenizer and
      resolution decide it (repa sample assumes 256 px for a file without our config);
    - the encoder/decoder split: not in the weights either (every block has the same keys), so it
      is the registered DDT's of this depth and width (DDT-XL/2: 22 of 28), None if there is none.
    """
    from repa.models.sit import MODELS

    try:
        hidden, patch_features = state_dict["x_embedder.proj.weight"].shape
        table_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"not a DDT state dict: missing {error}") from None
    if "blocks.0.attn.q_norm.weight" not in state_dict:
        raise ValueError("a DDT state dict without qk-norm weights does not tell its head count")
    head_dim = state_dict["blocks.0.attn.q_norm.weight"].shape[0]
    depth = len({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
    patch = next(
        (
            p
            for p in (2, 1)
            if patch_features % (p * p) == 0 and patch_features // (p * p) in _KNOWN_LATENT_CHANNELS
        ),
        1,
    )
    splits = {
        defaults["ddt_encoder_depth"]
        for defaults in MODELS.values()
        if defaults.get("ddt_encoder_depth")
        and (defaults["depth"], defaults["hidden_size"]) == (depth, hidden)
    }
    projectors = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("projectors.")})
    architecture = dict(
        hidden_size=int(hidden),
        depth=depth,
        num_heads=int(hidden) // int(head_dim),
        patch_size=patch,
        in_channels=int(patch_features) // patch**2,
        num_classes=int(table_rows) - 1,
        qk_norm=True,
        latent_batchnorm="bn.running_mean" in state_dict,
        projector_out_dims=[int(state_dict[f"projectors.{k}.4.weight"].shape[0]) for k in projectors],
        # None when no registered DDT has this depth and width: a run's config tells it, else
        # infer_ddt_name asks for --model
        ddt_encoder_depth=splits.pop() if len(splits) == 1 else None,
    )
    if projectors:
        architecture["projector_dim"] = int(state_dict["projectors.0.0.weight"].shape[0])
        # DDT's tap (after block 8); it does not change the velocity.
        architecture["align_depth"] = min(8, architecture["ddt_encoder_depth"] or 8)
    return architecture
