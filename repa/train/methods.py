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

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from repa.align import alignment_loss, resample_tokens, token_cosine
from repa.transport import denoising_loss, interpolate, sample_training_inputs


@dataclass
class StepInputs:
    """What one training step consumes, after tokenizing and encoding (no grad through these)."""

    latents: torch.Tensor  # (B, C, h, w) normalised latents, float32
    labels: torch.Tensor  # (B,) int64
    target_tokens: list[torch.Tensor]  # per encoder (B, T, D_k); empty for plain SiT
    # REPA-E: the SiT step reuses the time and noise of the VAE step's alignment pass.
    t: torch.Tensor | None = None  # (B,)
    noise: torch.Tensor | None = None  # (B, C, h, w)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # from auxiliary steps


class DenoisingMethod:
    """sit / repa / ldm: loss = mean denoising loss + proj_coeff * alignment loss."""

    def __init__(
        self,
        tokenizer: nn.Module,
        encoders: Sequence[nn.Module],
        path: str,
        time_sampler,
        proj_coeff: float,
        autocast: Callable = contextlib.nullcontext,
        resample_targets: bool = False,
    ):
        self.tokenizer = tokenizer
        self.encoders = list(encoders)
        self.path = path
        self.time_sampler = time_sampler
        self.proj_coeff = proj_coeff if self.encoders else 0.0
        self.autocast = autocast  # the loop's mixed-precision context, for the frozen parts
        self.resample_targets = resample_targets  # interpolate encoder tokens to the model's grid

    @torch.no_grad()
    def prepare(self, batch, device: torch.device) -> StepInputs:
        """uint8 images (or cached moments / features) -> normalised latents and target tokens.

        Caches are used when the batch carries them (the loop asks the stream for them only when
        they were made by this run's tokenizer and encoder). Cached moments are sampled
        (z = mean + std * eps) fresh each step, as REPA does; cached features replace the encoder
        forward, the largest saving on CPU and GPU alike.
        """
        with self.autocast():
            return self._prepare(batch, device)

    def _prepare(self, batch, device: torch.device) -> StepInputs:
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

    def state_dict(self) -> dict:
        """Auxiliary modules and optimisers the method owns (none here; REPA-E's VAE and critic)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def diffusion_inputs(self, inputs: StepInputs) -> tuple[torch.Tensor, ...]:
        """(t, x_t, target velocity) for the SiT step."""
        if inputs.t is None:
            t, _, x_t, target_velocity = sample_training_inputs(inputs.latents, self.path, self.time_sampler)
        else:
            t = inputs.t
            x_t, target_velocity = interpolate(self.path, inputs.latents, inputs.noise, t)
        return t, x_t, target_velocity

    def loss(self, model: nn.Module, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar to minimise and detached metrics. `model` may be DDP-wrapped."""
        t, x_t, target_velocity = self.diffusion_inputs(inputs)
        pred_velocity, projections = model(x_t, t, inputs.labels)
        denoise = denoising_loss(pred_velocity, target_velocity).mean()
        metrics = {"loss_denoise": denoise.detach()}
        loss = denoise
        if self.encoders:
            align = alignment_loss(projections, inputs.target_tokens, resample=self.resample_targets)
            loss = denoise + self.proj_coeff * align
            metrics["loss_align"] = align.detach()
            # mean cosine per encoder, the figure papers plot (0.6-0.75 is normal for REPA)
            for k, (h, z) in enumerate(zip(projections, inputs.target_tokens)):
                if self.resample_targets:
                    z = resample_tokens(z, h.shape[1])
                metrics[f"cos_sim_{k}"] = token_cosine(h.detach(), z).mean()
        metrics["loss"] = loss.detach()
        metrics.update(inputs.metrics)
        return loss, metrics


class REPAEMethod(DenoisingMethod):
    """REPA-E: the VAE trained end to end through the alignment loss (docs/conventions.md,
    "REPA-E training").

    Per step, in `prepare`: (1) a VAE step: reconstruction + LPIPS + KL + GAN losses plus
    `vae_align_coeff` x alignment of the SiT (frozen, eval, BatchNorm on running statistics)
    run on the sampled latent, so the alignment gradient reaches the VAE through the SiT; the
    diffusion loss never does. (2) a discriminator step (hinge). Then the loop's SiT step runs
    on the detached latent with the same t and noise, normalised by the SiT's BatchNorm in train
    mode (its running statistics are the E2E-VAE's latent statistics).

    The SiT's align-only pass stops after block `align_depth` (the reference runs all blocks and
    the final layer there, and runs the first blocks twice per step).
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        encoders: Sequence[nn.Module],
        path: str,
        time_sampler,
        proj_coeff: float,
        sit: nn.Module,
        vae_loss: nn.Module,
        vae_optimizer: torch.optim.Optimizer,
        disc_optimizer: torch.optim.Optimizer,
        vae_align_coeff: float,
        max_grad_norm: float,
        sync_gradients: Callable[[list[torch.Tensor]], bool],
        autocast: Callable,
        resample_targets: bool = False,
    ):
        super().__init__(tokenizer, encoders, path, time_sampler, proj_coeff, autocast, resample_targets)
        self.sit = sit  # unwrapped: the align-only pass needs no gradient synchronisation
        self.vae_loss = vae_loss
        self.vae_optimizer = vae_optimizer
        self.disc_optimizer = disc_optimizer
        self.vae_align_coeff = vae_align_coeff
        self.max_grad_norm = max_grad_norm
        self.sync_gradients = sync_gradients  # average over processes; False if any is non-finite
        self.vae_params = [p for p in tokenizer.parameters() if p.requires_grad]
        self.disc_params = list(vae_loss.discriminator.parameters())
        self.skipped_vae_steps = 0

    def _apply(self, loss: torch.Tensor, params: list[torch.Tensor], optimizer) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finite = self.sync_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(
            params, self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        )
        if finite and torch.isfinite(norm):
            optimizer.step()
        else:
            self.skipped_vae_steps += 1
        optimizer.zero_grad(set_to_none=True)
        return norm

    def prepare(self, batch, device: torch.device) -> StepInputs:
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        with torch.no_grad(), self.autocast():
            if batch.features is not None and len(self.encoders) == 1:
                target_tokens = [batch.features.to(device, non_blocking=True).float()]
            else:
                target_tokens = [encoder(images).float() for encoder in self.encoders]
        pixels = images.float() / 127.5 - 1.0  # [-1, 1]

        # (1) VAE step
        self.tokenizer.train()
        sit_was_training = self.sit.training
        self.sit.eval().requires_grad_(False)
        self.vae_loss.discriminator.requires_grad_(False)
        with self.autocast():
            mean, logvar = self.tokenizer.posterior(pixels)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            reconstructions = self.tokenizer.decode_float(z)
            latents = self.sit.normalize_latents(z.float())  # running statistics (eval mode)
            t = self.time_sampler(z.shape[0], self.path, device=device)
            noise = torch.randn_like(latents)
            x_t, _ = interpolate(self.path, latents, noise, t)
            _, projections = self.sit(x_t, t, labels, align_only=True)
            align = alignment_loss(projections, target_tokens, resample=self.resample_targets)
            generator_loss, parts = self.vae_loss.generator_loss(
                pixels, reconstructions.float(), mean, logvar
            )
            vae_loss = generator_loss + self.vae_align_coeff * align
        vae_grad_norm = self._apply(vae_loss, self.vae_params, self.vae_optimizer)
        self.sit.train(sit_was_training)
        for p in self.sit.parameters():
            p.requires_grad_(p is not getattr(self.sit, "pos_embed", None))
        self.vae_loss.discriminator.requires_grad_(True)

        # (2) discriminator step
        with self.autocast():
            disc_loss, disc_parts = self.vae_loss.discriminator_loss(pixels, reconstructions.detach().float())
        self._apply(disc_loss, self.disc_params, self.disc_optimizer)

        metrics = {f"vae_{k}": v for k, v in parts.items()}
        metrics.update(
            vae_loss=vae_loss.detach(),
            vae_align=align.detach(),
            vae_grad_norm=vae_grad_norm.detach(),
            disc_loss=disc_loss.detach(),
            **{f"disc_{k}": v for k, v in disc_parts.items()},
        )
        return StepInputs(z.detach().float(), labels, target_tokens, t=t, noise=noise, metrics=metrics)

    def diffusion_inputs(self, inputs: StepInputs) -> tuple[torch.Tensor, ...]:
        # The SiT's BatchNorm in train mode normalises the detached latent and updates the
        # running statistics (synchronised across GPUs when the loop converted it to SyncBN).
        latents = self.sit.normalize_latents(inputs.latents)
        x_t, target_velocity = interpolate(self.path, latents, inputs.noise, inputs.t)
        return inputs.t, x_t, target_velocity

    def state_dict(self) -> dict:
        return {
            "vae": self.tokenizer.state_dict(),
            "discriminator": self.vae_loss.discriminator.state_dict(),
            "vae_optimizer": self.vae_optimizer.state_dict(),
            "disc_optimizer": self.disc_optimizer.state_dict(),
            "skipped_vae_steps": self.skipped_vae_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.tokenizer.load_state_dict(state["vae"])
        self.vae_loss.discriminator.load_state_dict(state["discriminator"])
        self.vae_optimizer.load_state_dict(state["vae_optimizer"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.skipped_vae_steps = int(state.get("skipped_vae_steps", 0))
