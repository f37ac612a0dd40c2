"""The one interface every tokenizer offers, and the latent normalisation.

Data flow (REPA's convention): uint8 images -> posterior moments cat(mean, std) (what a data cache
stores) -> sampled z = mean + std * eps -> normalised latents (what the diffusion model sees) and back:
normalised latents -> z -> decoder -> uint8 images.
"""

from __future__ import annotations

import torch
from torch import nn

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # the LDM posterior's clamp, also used by REPA-E


class LatentNorm(nn.Module):
    """latents = (z - bias) * scale, per channel or scalar.

    - SD-VAE: scale 0.18215, bias 0.
    - REPA-E `NAME-latents-stats.pt`: scale = latents_scale (1/std), bias = latents_bias (mean).
    - LightningDiT / VA-VAE: (z - mean) / std, i.e. scale = 1/std, bias = mean.
    Buffers are not persistent: the statistics travel in their own file, not in the VAE's state dict.
    """

    def __init__(self, scale: float | torch.Tensor = 1.0, bias: float | torch.Tensor = 0.0):
        super().__init__()
        scale = torch.as_tensor(scale, dtype=torch.float32)
        bias = torch.as_tensor(bias, dtype=torch.float32)
        if scale.numel() > 1:
            scale = scale.reshape(1, -1, 1, 1)
        if bias.numel() > 1:
            bias = bias.reshape(1, -1, 1, 1)
        if not scale.is_meta and (not torch.isfinite(scale).all() or (scale == 0).any()):
            raise ValueError("latent scale must be finite and non-zero (a zero std in the statistics?)")
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_mean_std(cls, mean: torch.Tensor, std: torch.Tensor) -> LatentNorm:
        return cls(scale=1.0 / torch.as_tensor(std, dtype=torch.float64), bias=mean)

    @property
    def mean(self) -> torch.Tensor:
        return self.bias

    @property
    def std(self) -> torch.Tensor:
        return 1.0 / self.scale

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.bias) * self.scale

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale + self.bias

    def extra_repr(self) -> str:
        kind = "scalar" if self.scale.numel() == 1 else f"per-channel[{self.scale.numel()}]"
        return f"{kind}"


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 in [-1, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images (B, 3, H, W), got dtype {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def float_to_images(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8, rounded to nearest (the reference truncates, which darkens by 0.5)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class Tokenizer(nn.Module):
    """Base class: subclasses implement `posterior` and `decode_float`.

    `encode_moments`, `encode` and `decode` are inference paths (no gradients); REPA-E's end-to-end
    training uses the differentiable `posterior` and `decode_float` directly.
    """

    name: str
    latent_channels: int
    downsample: int

    def __init__(self, name: str, latent_channels: int, downsample: int, latent_norm: LatentNorm):
        super().__init__()
        self.name = name
        self.latent_channels = latent_channels
        self.downsample = downsample
        self.latent_norm = latent_norm
        self.frozen = False

    # ---- geometry -------------------------------------------------------------------------------------
    def latent_size(self, resolution: int) -> int:
        """Side of the latent grid for square images of `resolution` pixels."""
        if resolution % self.downsample:
            valid = resolution - resolution % self.downsample
            raise ValueError(
                f"resolution {resolution} is not divisible by the {self.name} tokenizer's downsampling "
                f"factor {self.downsample}; use e.g. {valid} or {valid + self.downsample}"
            )
        return resolution // self.downsample

    # ---- differentiable parts (subclasses) ------------------------------------------------------------
    def posterior(self, images_float: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images in [-1, 1] (B, 3, H, W) -> (mean, logvar) each (B, C, h, w); logvar in [-30, 20]."""
        raise NotImplementedError

    def decode_float(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised z (B, C, h, w) -> images in about [-1, 1] (B, 3, H, W), differentiable."""
        raise NotImplementedError

    # ---- inference API --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 (B, 2C, h, w) = cat(mean, std), REPA's cached layout."""
        mean, logvar = self.posterior(images_to_float(images))
        std = torch.exp(0.5 * logvar)
        return torch.cat([mean, std], dim=1).float()

    def sample(
        self,
        moments: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """moments (B, 2C, h, w) -> z = mean + std * eps (B, C, h, w), unnormalised."""
        mean, std = moments.chunk(2, dim=1)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return self.latent_norm.normalize(z)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return self.latent_norm.denormalize(latents)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images -> normalised latents (B, C, h, w), sampled from the posterior."""
        return self.normalize(self.sample(self.encode_moments(images), generator=generator))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> uint8 images (B, 3, H, W), rounded and clamped."""
        return float_to_images(self.decode_float(self.denormalize(latents)))

    # ---- frozen or trainable --------------------------------------------------------------------------
    def freeze(self) -> Tokenizer:
        """Eval mode (kept through later .train() calls) and no gradients: the REPA/LDM setting."""
        self.frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def unfreeze(self) -> Tokenizer:
        """Trainable: gradients on, train mode (REPA-E end-to-end training)."""
        self.frozen = False
        self.requires_grad_(True)
        return super().train(True)

    def set_trainable(self, trainable: bool) -> Tokenizer:
        return self.unfreeze() if trainable else self.freeze()

    def train(self, mode: bool = True) -> Tokenizer:
        # A frozen tokenizer stays in eval mode when a parent module is switched to training.
        return super().train(mode and not self.frozen)

    def autoencoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the published key names (for export); empty for `pixels`."""
        autoencoder = getattr(self, "autoencoder", None)
        return {} if autoencoder is None else autoencoder.state_dict()
