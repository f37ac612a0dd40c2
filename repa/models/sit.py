"""SiT: a DiT backbone trained with flow matching, with REPA's alignment tap.

Read top to bottom: blocks, final layer, the model, weight adapters, the size registry.
The module layout and parameter names match the published REPA / REPA-E checkpoints so that
they load with `strict=True` (the keys: docs/conventions.md, "Checkpoint keys").

Time convention: REPA's, t=0 is data and t=1 is noise; the network sees the raw t in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import nn

from repa.models.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    build_projector,
    modulate,
    sincos_pos_embed_2d,
)

# ----------------------------------------------------------------------------------------------
# Blocks


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (pre-norm, gated residuals)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # c -> (shift, scale, gate) for attention and for the MLP.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D); c: (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=-1
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """LayerNorm, adaLN shift/scale, then a linear map from each token to its p*p*C outputs."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C)


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
    num_classes: int = 1000
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
        self.projector_out_dims = [int(d) for d in self.projector_out_dims]

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2


class SiT(nn.Module):
    """Diffusion transformer predicting the flow-matching velocity.

    forward(x, t, y) -> (velocity (B, C, H, W), [projected tokens (B, T, D_k) per encoder]).
    """

    def __init__(self, config: SiTConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden, time_scale=config.time_scale)
        self.y_embedder = LabelEmbedder(config.num_classes, hidden, config.class_dropout_prob)
        # Fixed sin-cos embedding, stored as a frozen Parameter as in the published checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, hidden), requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                SiTBlock(hidden, config.num_heads, config.mlp_ratio, config.qk_norm)
                for _ in range(config.depth)
            ]
        )
        self.projectors = nn.ModuleList(
            [build_projector(hidden, config.projector_dim, dim) for dim in config.projector_out_dims]
        )
        self.final_layer = FinalLayer(hidden, config.patch_size, config.out_channels)
        if config.latent_batchnorm:
            self.bn = nn.BatchNorm2d(config.in_channels, eps=1e-4, momentum=0.1, affine=False)
        self.initialize_weights()

    @property
    def null_label(self) -> int:
        """The label index of the unconditional (null) class."""
        return self.config.num_classes

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, zero adaLN outputs and final layer (adaLN-Zero)."""

        def init_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(init_linear)
        pos_embed = sincos_pos_embed_2d(self.config.hidden_size, self.config.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).unsqueeze(0))
        # The patch conv is initialised like a linear layer on its flattened kernel.
        weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Zero-out adaLN modulation: every block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

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
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        tokens = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(
            y, train=self.training, force_drop_ids=force_drop_ids
        )  # (B, D)
        return tokens, c

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        *,
        align_only: bool = False,
        force_drop_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Velocity and projected alignment tokens.

        x: (B, C, H, W) noisy latents; t: (B,) times in [0, 1]; y: (B,) int64 labels.
        align_only: run only the blocks up to the alignment tap and return (None, projections);
        REPA-E's VAE step needs nothing else, and skipping the rest saves most of the pass.
        force_drop_ids: (B,) bool, labels replaced by the null class (classifier-free guidance
        training), in place of the model's own draw in train mode.
        """
        tokens, c = self._embed(x, t, y, force_drop_ids)
        projections: list[torch.Tensor] = []
        for depth, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c)
            if depth == self.config.align_depth and len(self.projectors):
                projections = [projector(tokens) for projector in self.projectors]  # each (B, T, D_k)
                if align_only:
                    return None, projections
        if align_only:
            raise ValueError("align_only=True needs a model with projectors (projector_out_dims is empty)")
        velocity = self.unpatchify(self.final_layer(tokens, c))  # (B, C_out, H, W)
        return velocity, projections

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sampler's view: velocity only; the projectors are never evaluated."""
        tokens, c = self._embed(x, t, y)
        for block in self.blocks:
            tokens = block(tokens, c)
        velocity = self.unpatchify(self.final_layer(tokens, c))
        if self.config.learn_sigma:
            velocity = velocity[:, : self.config.in_channels]
        return velocity

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


def load_state_dict_strict(model: SiT, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load with strict key and shape checking and a message that lists what differs."""
    expected = model.state_dict()
    state_dict = convert_legacy_state_dict(state_dict, model.config.align_depth)
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
_FAMILIES: dict[str, dict] = {
    # SiT as trained by REPA: raw t, velocity only.
    "SiT": {},
    # DiT as in its paper: t scaled to [0, 1000), learned variance (2C outputs). Kept for
    # `repa flops` comparisons with the DiT paper's table.
    "DiT": {"learn_sigma": True, "time_scale": 1000.0},
}
# name -> SiTConfig defaults; models are built by create_model(name, **overrides).
MODELS: dict[str, dict] = {}


def register_model(name: str, **defaults) -> None:
    """Add a named configuration (a new size, a new family) to the registry."""
    MODELS[name] = defaults


for _family, _family_defaults in _FAMILIES.items():
    for _size, (_depth, _hidden, _heads) in SIZES.items():
        for _patch in PATCH_SIZES:
            register_model(
                f"{_family}-{_size}/{_patch}",
                depth=_depth,
                hidden_size=_hidden,
                num_heads=_heads,
                patch_size=_patch,
                **_family_defaults,
            )


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
    return SiT(config_for(name, **overrides))
