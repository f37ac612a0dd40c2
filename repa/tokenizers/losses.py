"""REPA-E's VAE losses: L1 + LPIPS + KL + PatchGAN (hinge), images in [-1, 1] throughout.

Generator (VAE) loss = l1 * |x - x_rec| + lpips * LPIPS(x, x_rec) + kl * KL(q(z|x) || N(0, I))
                       + gan * (-mean D(x_rec)),  weights 1.0 / 1.0 / 1e-6 / 0.1, GAN on from step 0.
Discriminator loss  = 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec.detach()))).
(REPA-E adds its alignment loss through the frozen SiT; that term lives with the training method.)

LPIPS input range: LPIPS (v0.1) expects images in [-1, 1] and applies its ScalingLayer
((x - shift) / scale) once. REPA-E's training scripts already map images to [-1, 1], and its
`loss/lpips.py` then applied `x * 2 - 1` a second time, feeding VGG images in [-3, 1] (fixed upstream in
End2End-Diffusion/REPA-E pull request 17). Here `LPIPS.forward` takes [-1, 1] and does no other rescaling,
unless built with `legacy_rescale=True` (`--lpips-legacy-rescale`): then it computes what REPA-E's published
runs did, LPIPS_fixed(2x - 1, 2y - 1), to reproduce them.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The `lpips` package's weights/v0.1/vgg.pth holds these keys, one non-negative [1, C, 1, 1] each.
LPIPS_LINEAR_KEYS = tuple(f"lin{i}.model.1.weight" for i in range(5))
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# torchvision vgg16().features index ranges ending at those taps.
VGG16_TAP_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


@dataclass
class VAELossConfig:
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    kl_weight: float = 1e-6
    gan_weight: float = 0.1  # constant from step 0, as REPA-E
    disc_layers: int = 3
    disc_channels: int = 64


# ---- the simple terms ----------------------------------------------------------------------------------
def l1_loss(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements."""
    return (images - reconstructions).abs().mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over C, H, W and averaged over the batch."""
    per_sample = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
    return per_sample.mean()


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean D(fake): lower when the discriminator scores reconstructions as real."""
    return -logits_fake.mean()


# ---- LPIPS ---------------------------------------------------------------------------------------------
def _find_lpips_linear_weights(path: str | os.PathLike | None) -> Path:
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"LPIPS linear weights file {path} does not exist")
        return Path(path)
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
        if candidate.is_file():
            return candidate
    from repa.tokenizers.checkpoint import default_cache_dir

    candidate = default_cache_dir() / "lpips" / "vgg.pth"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        "LPIPS linear weights (v0.1 vgg.pth, keys lin0..lin4.model.1.weight) not found: pass "
        "linear_weights=PATH, `pip install lpips` (it ships weights/v0.1/vgg.pth), "
        f"or put the file at {candidate}"
    )


def _load_vgg16_features(path: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG16 weights (IMAGENET1K_V1, the ones LPIPS was calibrated with)."""
    from torchvision.models import VGG16_Weights

    url = VGG16_Weights.IMAGENET1K_V1.url
    if path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if not cached.is_file():
            raise FileNotFoundError(
                f"VGG16 ImageNet weights for LPIPS not found at {cached} (torchvision's cache). Download "
                f"{url} into that folder, or pass vgg_weights=PATH."
            )
        path = cached
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return {k[len("features.") :]: v for k, v in state_dict.items() if k.startswith("features.")}


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018, v0.1, VGG16): per image, the sum over five
    VGG taps of the spatial mean of w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2 (channel-normalised).

    Inputs in [-1, 1]; frozen (eval, no parameter gradients), gradients flow to the inputs.
    pretrained=False: random VGG weights (tests); the linear weights still come from `linear_weights`
    when given, else are set to ones/C. legacy_rescale: map inputs x -> 2x - 1 first (REPA-E's
    published double rescale; module docstring).
    """

    def __init__(
        self,
        linear_weights: str | os.PathLike | None = None,
        vgg_weights: str | os.PathLike | None = None,
        pretrained: bool = True,
        legacy_rescale: bool = False,
    ):
        super().__init__()
        self.legacy_rescale = legacy_rescale
        from torchvision.models.vgg import cfgs, make_layers

        # torchvision's VGG16 feature stack (same module indices as vgg16().features) without building
        # the 120M-parameter classifier that LPIPS never uses.
        features = make_layers(cfgs["D"], batch_norm=False)[: VGG16_TAP_SLICES[-1][1]]
        if pretrained:
            features.load_state_dict(_load_vgg16_features(vgg_weights), strict=True)
        self.slices = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in VGG16_TAP_SLICES)
        # LPIPS's ScalingLayer: maps [-1, 1] to ImageNet-normalised inputs ((x+1)/2 - mean) / std.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.linear = nn.ParameterList(
            nn.Parameter(torch.full((1, c, 1, 1), 1.0 / c)) for c in VGG16_TAP_CHANNELS
        )
        if pretrained or linear_weights is not None:
            self.load_linear_weights(_find_lpips_linear_weights(linear_weights))
        self.requires_grad_(False)
        self.eval()

    def load_linear_weights(self, path: str | os.PathLike) -> None:
        from repa.tokenizers.checkpoint import read_checkpoint

        state_dict = read_checkpoint(path)
        if set(state_dict) != set(LPIPS_LINEAR_KEYS):
            raise ValueError(
                f"{path} is not an LPIPS v0.1 linear-weights file: expected keys {list(LPIPS_LINEAR_KEYS)}, "
                f"found {sorted(state_dict)}"
            )
        for i, (key, channels) in enumerate(zip(LPIPS_LINEAR_KEYS, VGG16_TAP_CHANNELS)):
            weight = state_dict[key]
            if tuple(weight.shape) != (1, channels, 1, 1):
                raise ValueError(
                    f"{path}: {key} has shape {tuple(weight.shape)}, expected (1, {channels}, 1, 1)"
                )
            if (weight < 0).any():
                raise ValueError(f"{path}: {key} has negative entries; LPIPS linear weights are non-negative")
            self.linear[i].data.copy_(weight)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always eval: no dropout, fixed network

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """images, reconstructions (B, 3, H, W) in [-1, 1] -> distance per image (B,)."""
        if self.legacy_rescale:  # REPA-E's published runs: a second [0, 1] -> [-1, 1] rescale
            images, reconstructions = images * 2 - 1, reconstructions * 2 - 1
        x = (images - self.shift) / self.scale
        y = (reconstructions - self.shift) / self.scale
        distance = torch.zeros(images.shape[0], device=images.device, dtype=images.dtype)
        for block, weight in zip(self.slices, self.linear):
            x, y = block(x), block(y)
            x_unit = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            y_unit = y / (y.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            weighted = ((x_unit - y_unit).pow(2) * weight).sum(dim=1)  # (B, h, w): the 1x1 linear layer
            distance = distance + weighted.mean(dim=(1, 2))
        return distance


# ---- PatchGAN discriminator ---------------------------------------------------------------------------
class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming-transformers): 4x4 convs, BatchNorm, LeakyReLU(0.2); outputs a logit map.

    Layout and keys (`main.{i}.*`) follow taming's NLayerDiscriminator with use_actnorm=False.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            previous, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last widening conv keeps the resolution
            layers += [
                nn.Conv2d(channels * previous, channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """taming's weights_init: conv weights N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> logits (B, 1, H/8 - 2, W/8 - 2) for 3 layers."""
        return self.main(images)


def load_discriminator(discriminator: NLayerDiscriminator, path: str | os.PathLike) -> None:
    """Load a PatchGAN state dict in REPA-E's layout (`main.{i}.*`: its --disc-pretrained-ckpt file,
    a bare state dict) strictly; REPA-E's training checkpoints (under "discriminator") load too."""
    from repa.tokenizers.checkpoint import load_state_dict_strict, read_checkpoint

    state = read_checkpoint(path)
    if isinstance(state.get("discriminator"), dict):
        state = state["discriminator"]
    if state and all(key.startswith("module.") for key in state):  # saved from a DDP wrapper
        state = {key[len("module.") :]: value for key, value in state.items()}
    load_state_dict_strict(discriminator, state, f"discriminator checkpoint {path}")


# ---- the combination ----------------------------------------------------------------------------------
class VAELoss(nn.Module):
    """REPA-E's VAE objective; owns the LPIPS network and the discriminator."""

    def __init__(self, config: VAELossConfig | None = None, lpips: LPIPS | None = None):
        super().__init__()
        self.config = config or VAELossConfig()
        # With lpips_weight 0 no VGG is built (and no VGG/LPIPS weight files are needed).
        if lpips is None and self.config.lpips_weight > 0:
            lpips = LPIPS()
        self.lpips = lpips
        self.discriminator = NLayerDiscriminator(
            channels=self.config.disc_channels, num_layers=self.config.disc_layers
        )

    def generator_loss(
        self, images: torch.Tensor, reconstructions: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images, reconstructions in [-1, 1]; (mean, logvar) the posterior. The discriminator is only
        read here (its parameters get gradients only from `discriminator_loss`'s backward if the caller
        steps just the VAE optimiser, as REPA-E does)."""
        c = self.config
        parts = {
            "l1": l1_loss(images, reconstructions),
            "lpips": self.lpips(images, reconstructions).mean()
            if self.lpips is not None
            else images.new_zeros(()),
            "kl": kl_loss(mean, logvar),
            "gan": generator_adversarial_loss(self.discriminator(reconstructions)),
        }
        total = (
            c.l1_weight * parts["l1"]
            + c.lpips_weight * parts["lpips"]
            + c.kl_weight * parts["kl"]
            + c.gan_weight * parts["gan"]
        )
        return total, {k: v.detach() for k, v in parts.items()}

    def discriminator_loss(
        self, images: torch.Tensor, reconstructions: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        loss = hinge_discriminator_loss(logits_real, logits_fake)
        return loss, {"logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}
