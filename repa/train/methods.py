"""Per-method step maths: which losses are computed and which parameters they update.

The loop (repa/train/loop.py) owns devices, precision, distribution, checkpoints and logging; a
method owns the arithmetic of one step. Methods:

  sit    denoising loss only (plain SiT baseline)
  repa   denoising loss + proj_coeff * alignment to frozen encoder tokens
  ldm    repa on a frozen VAE whose latents are normalised with fixed statistics
         (e.g. an exported E2E-VAE and its latents-stats file)
  repa-e REPA-E end to end: a VAE step, a discriminator step, then the SiT step (REPAEMethod)

sit, repa and ldm are the same arithmetic (DenoisingMethod); they differ only in whether there
are encoders and in which tokenizer and normalisation are configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from repa.align import alignment_loss, token_cosine
from repa.transport import denoising_loss, sample_training_inputs


@dataclass
class StepInputs:
    """What one training step consumes, after tokenizing and encoding (no grad through these)."""

    latents: torch.Tensor  # (B, C, h, w) normalised latents, float32
    labels: torch.Tensor  # (B,) int64
    target_tokens: list[torch.Tensor]  # per encoder (B, T, D_k); empty for plain SiT


class DenoisingMethod:
    """sit / repa / ldm: loss = mean denoising loss + proj_coeff * alignment loss."""

    def __init__(
        self,
        tokenizer: nn.Module,
        encoders: Sequence[nn.Module],
        path: str,
        time_sampler,
        proj_coeff: float,
    ):
        self.tokenizer = tokenizer
        self.encoders = list(encoders)
        self.path = path
        self.time_sampler = time_sampler
        self.proj_coeff = proj_coeff if self.encoders else 0.0

    @torch.no_grad()
    def prepare(self, batch, device: torch.device) -> StepInputs:
        """uint8 images (or cached moments / features) -> normalised latents and target tokens.

        Caches are used when the batch carries them (the loop asks the stream for them only when
        they were made by this run's tokenizer and encoder). Cached moments are sampled
        (z = mean + std * eps) fresh each step, as REPA does; cached features replace the encoder
        forward, the largest saving on CPU and GPU alike.
        """
        images = batch.images.to(device, non_blocking=True)
        if batch.moments is not None:
            moments = batch.moments.to(device, non_blocking=True).float()
        else:
            moments = self.tokenizer.encode_moments(images)
        latents = self.tokenizer.normalize(self.tokenizer.sample(moments)).float()
        if batch.features is not None and len(self.encoders) == 1:
            target_tokens = [batch.features.to(device, non_blocking=True).float()]
        else:
            target_tokens = [encoder(images).float() for encoder in self.encoders]
        return StepInputs(latents, batch.labels.to(device, non_blocking=True), target_tokens)

    def loss(self, model: nn.Module, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar to minimise and detached metrics. `model` may be DDP-wrapped."""
        t, noise, x_t, target_velocity = sample_training_inputs(inputs.latents, self.path, self.time_sampler)
        pred_velocity, projections = model(x_t, t, inputs.labels)
        denoise = denoising_loss(pred_velocity, target_velocity).mean()
        metrics = {"loss_denoise": denoise.detach()}
        loss = denoise
        if self.encoders:
            align = alignment_loss(projections, inputs.target_tokens)
            loss = denoise + self.proj_coeff * align
            metrics["loss_align"] = align.detach()
            # mean cosine per encoder, the figure papers plot (0.6-0.75 is normal for REPA)
            for k, (h, z) in enumerate(zip(projections, inputs.target_tokens)):
                metrics[f"cos_sim_{k}"] = token_cosine(h.detach(), z).mean()
        metrics["loss"] = loss.detach()
        return loss, metrics
