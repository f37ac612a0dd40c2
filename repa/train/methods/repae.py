"""REPA-E: the VAE trained end to end through the alignment loss (docs/conventions.md,
"REPA-E training").

Three groups (four with iREPA's conv projector), updated in this order from the same micro-batch:
  vae     reconstruction + LPIPS + KL + GAN losses, plus vae_align_coeff x the alignment of the
          SiT (frozen, eval mode, BatchNorm on running statistics) run on the sampled latent:
          the alignment gradient reaches the VAE through the SiT; the diffusion loss never does.
  critic  the PatchGAN discriminator's hinge loss on the detached reconstructions.
  sit     denoising + proj_coeff x alignment on the detached latent with the same t and noise,
          normalised by the batch's statistics (over all ranks, as the reference's SyncBatchNorm
          in train mode); the SiT's BatchNorm running statistics, the E2E-VAE's latent
          statistics, move once per optimiser step from all of the step's samples.
  heads   with iREPA's --projector conv only: the conv projectors, on the SiT step's alignment
          (as in the denoising method). The VAE step aligns through them, frozen, as through the
          SiT and as REPA-E does through the SiT's own MLP projectors: the VAE's alignment
          gradient reaches the VAE, never the projectors.
Every loss is computed from the weights before the step, so computing all of them and then
stepping the optimisers gives the reference's sequential updates exactly.

The SiT's align-only pass stops after block `align_depth` (the reference runs all blocks and
the final layer there, and runs the first blocks twice per step).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from repa.align import alignment_loss
from repa.config import ExperimentConfig
from repa.train.methods.base import GroupLoss, MethodContext, ParamGroup
from repa.train.methods.denoising import DenoisingMethod
from repa.train.methods.objectives import check_objectives, run_until_block
from repa.train.optim import adamw
from repa.train.randomness import StepNoise
from repa.transport import interpolate


def init_latent_batchnorm(model: nn.Module, tokenizer) -> None:
    """Start the SiT's latent BatchNorm at the tokenizer's statistics (mean = bias,
    var = 1 / scale^2), so step 0 normalises like the tokenizer would."""
    norm = tokenizer.latent_norm
    channels = model.bn.running_mean.numel()
    with torch.no_grad():
        model.bn.running_mean.copy_(norm.bias.float().flatten().expand(channels))
        model.bn.running_var.copy_((1.0 / norm.scale.float().flatten() ** 2).expand(channels))


class REPAEMethod(DenoisingMethod):
    model_options = {"latent_batchnorm": True}
    own_losses_train_heads = True  # iREPA's conv projectors: `losses` yields `heads_loss()`

    def __init__(
        self,
        *args,
        sit: nn.Module,
        vae_loss: nn.Module,
        vae_group: ParamGroup,
        critic_group: ParamGroup,
        vae_align_coeff: float,
        world_size: int = 1,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.sit = sit  # unwrapped: the align-only pass needs no gradient synchronisation
        self.vae_loss = vae_loss
        self.vae_group, self.critic_group = vae_group, critic_group
        self.vae_align_coeff = vae_align_coeff
        self.world_size = world_size
        self._latent_moments: list[torch.Tensor] = []  # this step's (count, sum, sum of squares)

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        if not config.encoder.enabled:
            raise ValueError("--method repa-e aligns to an encoder: set --encoder (e.g. dinov2-b)")
        if config.tokenizer.tokenizer == "pixels":
            raise ValueError("--method repa-e trains a VAE end to end: choose a VAE tokenizer, not pixels")
        if not 0 < config.vae.bn_momentum <= 1:
            raise ValueError(f"--bn-momentum must be in (0, 1], got {config.vae.bn_momentum}")
        check_objectives(config, config.method)

    @classmethod
    def build(cls, context: MethodContext) -> REPAEMethod:
        from repa.tokenizers.losses import LPIPS, VAELoss, VAELossConfig, load_discriminator

        config, tokenizer, model = context.config, context.tokenizer, context.model
        tokenizer.unfreeze()
        init_latent_batchnorm(model, tokenizer)
        vae = config.vae
        model.bn.momentum = vae.bn_momentum  # REPA-E's --bn-momentum; finish_step moves by it
        lpips = None
        if vae.lpips_weight > 0:
            lpips = LPIPS(vae.lpips_weights, vae.vgg_weights, legacy_rescale=vae.lpips_legacy_rescale)
        loss_config = VAELossConfig(
            l1_weight=vae.l1_weight,
            lpips_weight=vae.lpips_weight,
            kl_weight=vae.kl_weight,
            gan_weight=vae.gan_weight,
            disc_layers=vae.disc_layers,
        )
        vae_loss = VAELoss(loss_config, lpips=lpips)
        if vae.disc_pretrained_ckpt:  # a resumed run then loads its own discriminator over it
            load_discriminator(vae_loss.discriminator, vae.disc_pretrained_ckpt)
        vae_loss = vae_loss.to(context.device)
        vae_params = [p for p in tokenizer.parameters() if p.requires_grad]
        discriminator = vae_loss.discriminator
        clip = config.optim.max_grad_norm  # each group's own norm unless set apart
        vae_clip = clip if vae.vae_max_grad_norm is None else vae.vae_max_grad_norm
        disc_clip = clip if vae.disc_max_grad_norm is None else vae.disc_max_grad_norm
        return super().build(
            context,
            sit=model,
            vae_loss=vae_loss,
            vae_group=ParamGroup(
                "vae", tokenizer, adamw(vae_params, vae.vae_learning_rate, config), vae_clip
            ),
            critic_group=ParamGroup(
                "critic",
                discriminator,
                adamw(list(discriminator.parameters()), vae.disc_learning_rate, config),
                disc_clip,
            ),
            vae_align_coeff=vae.vae_align_coeff,
            world_size=context.world_size,
        )

    def groups(self) -> list[ParamGroup]:
        heads = [self.heads_group] if self.heads_group is not None else []
        return [self.vae_group, self.critic_group, self.model_group, *heads]

    def batch_fields(self, cached: frozenset[str]) -> frozenset[str]:
        """Always the images (the VAE trains on them; cached latents would be stale), and the
        cached encoder tokens when there are."""
        return frozenset({"images"} | ({"features"} & cached))

    def losses(self, model: nn.Module, batch, noise: StepNoise) -> Iterator[GroupLoss]:
        device = noise.device
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        target_tokens = self.target_tokens(batch, images)
        pixels = images.float() / 127.5 - 1.0  # [-1, 1]
        discriminator = self.vae_loss.discriminator

        # (1) VAE: the SiT runs in eval mode (its BatchNorm uses, and does not move, its running
        # statistics) with its parameters frozen, and the conv projectors (iREPA) frozen too, so
        # the alignment gradient stops at the VAE; the discriminator is frozen for the
        # generator's adversarial term.
        self.tokenizer.train()
        sit_was_training = self.sit.training
        heads = self.heads.parameters() if self.heads_group is not None else ()
        frozen = [p for p in (*self.sit.parameters(), *discriminator.parameters(), *heads) if p.requires_grad]
        self.sit.eval()
        for p in frozen:
            p.requires_grad_(False)
        try:
            mean, logvar = self.tokenizer.posterior(pixels)
            eps = noise.normal("posterior", tuple(mean.shape[1:]), dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
            reconstructions = self.tokenizer.decode_float(z)
            latents = self.sit.normalize_latents(z.float())  # running statistics (eval mode)
            t = noise.draw("t", lambda n, g: self.time_sampler(n, self.path, generator=g, device=device))
            x_t, _ = interpolate(self.path, latents, noise.normal("noise", tuple(latents.shape[1:])), t)
            projections = self.vae_step_projections(x_t, t, labels)
            align = alignment_loss(projections, target_tokens, resample=self.resample_targets)
            generator_loss, parts = self.vae_loss.generator_loss(
                pixels, reconstructions.float(), mean, logvar
            )
            vae_loss = generator_loss + self.vae_align_coeff * align
            metrics = {f"vae_{k}": v for k, v in parts.items()}
            metrics.update(vae_loss=vae_loss.detach(), vae_align=align.detach())
            yield GroupLoss(self.vae_group.name, vae_loss, metrics)
        finally:
            self.sit.train(sit_was_training)
            for p in frozen:
                p.requires_grad_(True)

        # (2) critic, on the reconstructions made by the VAE before its update
        disc_loss, disc_parts = self.vae_loss.discriminator_loss(pixels, reconstructions.detach().float())
        yield GroupLoss(
            self.critic_group.name,
            disc_loss,
            {"disc_loss": disc_loss.detach(), **{f"disc_{k}": v for k, v in disc_parts.items()}},
        )

        # (3) SiT, on the detached latent with the same t and noise (drawn under the same names),
        # normalised by the batch's statistics as the SiT's BatchNorm does in train mode
        latents = self.normalize_by_batch(z.detach().float())
        yield self.model_loss(model, latents, labels, target_tokens, noise)
        heads_loss = self.heads_loss()  # (4) the conv projectors, on the SiT step's hidden states
        if heads_loss is not None:
            yield heads_loss

    def vae_step_projections(
        self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
    ) -> list[torch.Tensor]:
        """The frozen SiT's projections [(B, T, D_k)] for the VAE's alignment, the blocks after
        the alignment block never run: REPA's MLP projectors (the model's align-only pass), or
        iREPA's conv projectors on block align_depth's output."""
        if self.conv_projectors is None:
            return self.sit(x_t, t, labels, align_only=True)[1]
        hidden = run_until_block(self.sit, self.align_depth, x_t, t, labels)  # (B, T, D)
        return [projector(hidden) for projector in self.conv_projectors]

    @torch.no_grad()
    def normalize_by_batch(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> normalised by per-channel statistics over this micro-batch on every
        rank (SyncBatchNorm's), with the BatchNorm's eps. The running statistics are not touched
        here: `finish_step` moves them once per optimiser step, from all of the step's samples,
        so that every micro-batch's VAE pass sees the statistics the step started with."""
        bn = self.sit.bn
        z64 = z.double()
        moments = torch.stack(
            [
                torch.full((z.shape[1],), z.numel() / z.shape[1], dtype=torch.float64, device=z.device),
                z64.sum(dim=(0, 2, 3)),
                z64.square().sum(dim=(0, 2, 3)),
            ]
        )  # (3, C)
        if self.world_size > 1:
            torch.distributed.all_reduce(moments)
        self._latent_moments.append(moments)
        count, total, squares = moments
        mean = total / count
        var = (squares / count - mean.square()).clamp_min(0)  # biased, as BatchNorm normalises
        shape = (1, -1, 1, 1)
        return ((z64 - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)).float()

    @torch.no_grad()
    def finish_step(self, updated: bool) -> None:
        """Move the SiT's BatchNorm running statistics by one momentum step towards this
        step's (unbiased) batch statistics; a skipped step moves nothing."""
        moments, self._latent_moments = self._latent_moments, []
        if not updated or not moments:
            return
        count, total, squares = torch.stack(moments).sum(dim=0)
        mean = total / count
        var = (squares / count - mean.square()).clamp_min(0) * count / (count - 1).clamp_min(1)
        bn = self.sit.bn
        momentum = bn.momentum
        bn.running_mean.mul_(1 - momentum).add_(momentum * mean.to(bn.running_mean.dtype))
        bn.running_var.mul_(1 - momentum).add_(momentum * var.to(bn.running_var.dtype))
        bn.num_batches_tracked.add_(1)

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),  # the heads, with --projector conv
            "vae": self.tokenizer.state_dict(),
            "discriminator": self.vae_loss.discriminator.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.tokenizer.load_state_dict(state["vae"])
        self.vae_loss.discriminator.load_state_dict(state["discriminator"])

    def export(self, ema_model: nn.Module, directory: Path) -> None:
        """REPA-E's deliverable: the trained VAE and its latent statistics read from the EMA
        model's BatchNorm, in the layout `--tokenizer PATH` (LDM-only training, sampling) loads."""
        from repa.runs import TRAINED_TOKENIZER, TRAINED_TOKENIZER_STATS
        from repa.tokenizers import save_latent_stats

        weights = {
            k: v.detach().cpu().contiguous() for k, v in self.tokenizer.autoencoder_state_dict().items()
        }
        torch.save(weights, directory / TRAINED_TOKENIZER)  # samples of the checkpoint decode with it
        bn = ema_model.bn
        save_latent_stats(
            directory / TRAINED_TOKENIZER_STATS, bn.running_mean, torch.sqrt(bn.running_var + bn.eps)
        )
