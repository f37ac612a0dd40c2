"""Training FLOPs per image of a run's configuration: the compute axis of `repa curves`.

    cost = training_cost(config, latents_cached=True, features_cached=False)
    cost.per_image             # multiply-adds one training image costs, every part of the step
    cost.parts                 # {"sit": ..., "encoder": ..., "tokenizer_encode": ..., ...}

Convention: one multiply-add is one FLOP (the DiT paper's, as `repa flops` prints), a backward
pass costs twice its forward (the usual 1 + 2 = 3x for a trained network), frozen networks run
forward only. Every forward is counted by `repa.analysis.flops.count_flops` on networks built on
the meta device (no weights read, nothing computed), so the figures are `repa flops` figures.

Parts of one training image's step:
  sit               3 x the SiT's training forward (blocks, final layer and the REPA projectors)
  encoder           each frozen target encoder's forward, unless its tokens are cached in the shards
  tokenizer_encode  the tokenizer's encoder half (posterior), unless the latents are cached
  method extras     what a method adds (METHOD_EXTRAS, by method name), e.g. REPA-E's:
                    vae 3 x (encode + decode), the trained VAE; its latents are never cached
                    sit_align 3 x the SiT's align-only pass (blocks up to the tap), whose gradient
                              reaches the VAE through the frozen SiT
                    critic 3 x one discriminator pass for the generator term plus 3 x two for
                              the critic's real and fake passes
                    (LPIPS's VGG passes are not counted: `--lpips-weight` 0 has none; with it on,
                    REPA-E's figure is a lower bound.)
A random-weight control encoder (`NAME:random`) costs what NAME costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from repa.analysis.flops import count_flops
from repa.config import ExperimentConfig

BACKWARD_FACTOR = 2  # a backward pass costs twice its forward


@dataclass
class TrainingCost:
    parts: dict[str, int] = field(default_factory=dict)  # multiply-adds per training image

    @property
    def per_image(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict:
        return {"per_image": self.per_image, "parts": dict(self.parts)}


@dataclass
class _Parts:
    """The run's networks on the meta device, built once for every part's count."""

    config: ExperimentConfig
    tokenizer: torch.nn.Module
    encoders: list
    model: torch.nn.Module
    latents: torch.Tensor  # (1, C, h, w)
    images: torch.Tensor  # (1, 3, R, R) uint8
    labels: torch.Tensor
    t: torch.Tensor


def _build(config: ExperimentConfig) -> _Parts:
    from repa.encoders import create_encoders
    from repa.models import create_model
    from repa.tokenizers import create_tokenizer

    resolution = config.data.resolution
    with torch.device("meta"):
        tokenizer = create_tokenizer(
            config.tokenizer.tokenizer, resolution=resolution, pretrained=False, require_stats=False
        )
        encoders = (
            create_encoders(config.encoder.encoder, resolution=resolution, pretrained=False)
            if config.encoder.enabled
            else []
        )
        latent_size = tokenizer.latent_size(resolution)
        overrides = config.model_overrides(
            input_size=latent_size,
            in_channels=tokenizer.latent_channels,
            projector_dims=[encoder.dim for encoder in encoders],
        )
        if config.run.method == "repa-e":
            overrides["latent_batchnorm"] = True
        model = create_model(config.model.name, **overrides).eval()
        latents = torch.zeros(1, tokenizer.latent_channels, latent_size, latent_size)
        images = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8)
        labels = torch.zeros(1, dtype=torch.long)
        t = torch.zeros(1)
    return _Parts(config, tokenizer, encoders, model, latents, images, labels, t)


def _repae_extras(parts: _Parts) -> dict[str, int]:
    from repa.tokenizers.losses import NLayerDiscriminator, VAELossConfig

    pixels = parts.images.float()
    encode = count_flops(parts.tokenizer.posterior, pixels)
    decode = count_flops(parts.tokenizer.decode_float, parts.latents)
    with torch.device("meta"):
        discriminator = NLayerDiscriminator(
            channels=VAELossConfig.disc_channels, num_layers=parts.config.vae.disc_layers
        )
    critic = count_flops(discriminator, pixels)
    align = count_flops(parts.model, parts.latents, parts.t, parts.labels, align_only=True)
    factor = 1 + BACKWARD_FACTOR
    return {
        "vae": factor * (encode + decode),
        "sit_align": factor * align,
        "critic": factor * 3 * critic,
        "tokenizer_encode": 0,  # the VAE step above encodes; REPA-E never reads cached latents
    }


# method name -> its extra parts per image (a dict that may also replace a standard part)
METHOD_EXTRAS: dict[str, Callable[[_Parts], dict[str, int]]] = {"repa-e": _repae_extras}


def training_cost(
    config: ExperimentConfig | dict, *, latents_cached: bool, features_cached: bool
) -> TrainingCost:
    """Multiply-adds one training image costs under `config` (see the module docstring)."""
    if isinstance(config, dict):
        config = ExperimentConfig.from_dict(config)
    parts = _build(config)
    width = getattr(parts.model.config, "class_token_dim", 0)  # REG: its noisy class token too
    extra = {"class_token": torch.zeros(1, width, device=parts.latents.device)} if width else {}
    model_forward = count_flops(parts.model, parts.latents, parts.t, parts.labels, **extra)
    cost = TrainingCost({"sit": (1 + BACKWARD_FACTOR) * model_forward})
    cost.parts["encoder"] = (
        0 if features_cached else sum(count_flops(encoder, parts.images) for encoder in parts.encoders)
    )
    needs_encode = config.tokenizer.tokenizer != "pixels" and not latents_cached
    cost.parts["tokenizer_encode"] = (
        count_flops(parts.tokenizer.posterior, parts.images.float()) if needs_encode else 0
    )
    extras = METHOD_EXTRAS.get(config.run.method)
    if extras is not None:
        cost.parts.update(extras(parts))
    return cost
