"""reg: REG (Representation Entanglement for Generation) = REPA + the encoder's class token as one
extra token of the SiT, noised and denoised with the latent (docs/reg.md).

Per sample, with the same t as the latent and its own noise e_c (named draw "class_token_noise"):
    c_t = alpha_t c + sigma_t e_c            (linear path: (1 - t) c + t e_c)
    target class velocity v_c = alpha'_t c + sigma'_t e_c     (linear: e_c - c)
The SiT sees [c_t; patches] (repa/models/sit.py, class_token_dim) and predicts both velocities;
its REPA projection covers [class token; patches] and aligns to the encoder's [c; patch tokens].
    loss = L_v(latent) + proj_coeff * L_REPA([CLS; patches]) + cls_loss_weight * L_v(class token)
each L_v a per-sample mean of squared errors averaged over the batch (REG: 0.5 and 0.03).

Composes with the objective options that act on the latent velocity or the alignment targets
(--cos-loss-weight, --dispersive-weight, --target-norm zscore on the patch tokens, --align-target
shuffled), with --align-resample (patch tokens only) and with TREAD (the class token is always
kept). Not with iREPA's conv projector (the class token has no grid position), HASTE's
--align-until-step (the class token is the model's input at every step, so the encoder never
stops) or its attention distillation.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from repa.align import (
    alignment_loss,
    derangement,
    resample_tokens,
    spatial_zscore,
    token_cosine,
)
from repa.config import ExperimentConfig
from repa.train.methods.base import GroupLoss
from repa.train.methods.denoising import DenoisingMethod, routed_targets
from repa.train.methods.objectives import add_objective_terms
from repa.train.randomness import StepNoise
from repa.transport import denoising_loss, interpolate


class REGMethod(DenoisingMethod):
    """REPA plus REG's class token; see the module docstring."""

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        if not config.encoder.enabled or "," in config.encoder.encoder:
            raise ValueError(
                "--method reg denoises one encoder's class token: set --encoder to a single encoder with "
                "a class token (REG: dinov2-b)"
            )
        objective = config.objective
        if objective.cls_loss_weight < 0:
            raise ValueError(f"--cls-loss-weight must be >= 0 (REG: 0.03), got {objective.cls_loss_weight}")
        if objective.projector == "conv":
            raise ValueError(
                "--method reg aligns [class token; patches], and the class token has no grid position for "
                "--projector conv: use --projector mlp"
            )
        if objective.attn_distill_weight > 0:
            raise ValueError(
                "--method reg does not wire HASTE's attention distillation (its SiT attention has the class "
                "token): leave --attn-distill-weight at 0"
            )
        if objective.align_until_step:
            raise ValueError(
                "--method reg feeds the encoder's class token to the model at every step, so alignment "
                "cannot end: leave --align-until-step at 0"
            )
        super().check_config(config)

    @classmethod
    def needs_encoders(cls, config: ExperimentConfig, start_step: int) -> bool:
        return True

    @classmethod
    def build(cls, context, **extra) -> REGMethod:
        encoders = context.encoders
        if encoders and not encoders[0].has_class_token:
            raise ValueError(
                f"--method reg needs an encoder with a class token; '{encoders[0].name}' has none "
                "(choose e.g. dinov2-b)"
            )
        method = super().build(context, **extra)
        method.cls_loss_weight = context.config.objective.cls_loss_weight
        return method

    def batch_fields(self, cached: frozenset[str]) -> frozenset[str]:
        """As REPA's: cached features are read only when they hold the class token (the loop's
        `cached` offers them only then: repa.train.setup.cached_fields)."""
        return super().batch_fields(cached)

    @torch.no_grad()
    def target_tokens(self, batch, images: torch.Tensor | None, device=None) -> list[torch.Tensor]:
        """[(B, 1 + T, D)]: the encoder's [class token; patch tokens], float32, from the cache
        (built with --with-class-token, class token first) or the encoder. iREPA's z-score, when
        asked, normalises the patch tokens only (the class token has no spatial pattern)."""
        if batch.features is not None:
            device = device if device is not None else images.device
            tokens = batch.features.to(device, non_blocking=True).float()  # (B, 1 + T, D)
            class_token, patches = tokens[:, 0], tokens[:, 1:]
        else:
            patches, class_token = self.encoders[0].forward_with_class_token(images)
            patches, class_token = patches.float(), class_token.float()
        if self.objective.target_norm == "zscore":
            patches = spatial_zscore(patches, self.objective.target_norm_gamma)
        return [torch.cat([class_token.unsqueeze(1), patches], dim=1)]

    def model_loss(
        self,
        model: nn.Module,
        latents: torch.Tensor,  # (B, C, h, w) normalised, no gradient
        labels: torch.Tensor,  # (B,)
        target_tokens: list[torch.Tensor],  # [(B, 1 + T, D)]: [class token; patches]
        noise: StepNoise,
        condition: dict[str, torch.Tensor] | None = None,  # a text model's context and mask
    ) -> GroupLoss:
        """REPA's loss on [CLS; patches] plus the class token's denoising loss; draws "t",
        "noise", "class_token_noise", "label_drop", "route" (TREAD) and "align_shuffle"."""
        t = noise.draw("t", lambda n, g: self.time_sampler(n, self.path, generator=g, device=noise.device))
        eps = noise.normal("noise", tuple(latents.shape[1:]), dtype=latents.dtype)
        x_t, target_velocity = interpolate(self.path, latents, eps, t)
        class_token = target_tokens[0][:, 0]  # (B, D) clean
        class_eps = noise.normal("class_token_noise", tuple(class_token.shape[1:]), dtype=class_token.dtype)
        class_t, target_class_velocity = interpolate(self.path, class_token, class_eps, t)
        drop = noise.uniform("label_drop") < self.label_dropout if self.label_dropout > 0 else None
        route = {}
        if self.routed_tokens:
            route["route_ids"] = noise.permutations("route", self.routed_tokens)  # (B, T) grid tokens
        with self.taps.capturing() if self.taps is not None else contextlib.nullcontext({}) as hidden:
            (pred_velocity, pred_class_velocity), projections = model(
                x_t, t, labels, force_drop_ids=drop, class_token=class_t, **route, **(condition or {})
            )
        if self.resample_targets:  # --align-resample: the patch tokens to the model's grid
            num_patches = route["route_ids"].shape[1] if route else projections[0].shape[1] - 1
            target_tokens = [self._resampled(z, num_patches) for z in target_tokens]
        if self.objective.align_target == "shuffled":  # control arm: another sample's tokens
            source = derangement(noise.uniform("align_shuffle"))
            target_tokens = [z[source] for z in target_tokens]
        if route:  # the tap inside the route sees [CLS; kept patches]: gather the same targets
            route_ids = route["route_ids"]
            target_tokens = [self._routed(z, h, route_ids) for h, z in zip(projections, target_tokens)]

        denoise = denoising_loss(pred_velocity, target_velocity).mean()
        class_denoise = denoising_loss(pred_class_velocity, target_class_velocity).mean()
        align = alignment_loss(projections, target_tokens)
        loss = denoise + self.proj_coeff * align + self.cls_loss_weight * class_denoise
        metrics = {
            "loss_denoise": denoise.detach(),
            "loss_align": align.detach(),
            "loss_cls": class_denoise.detach(),
        }
        loss = add_objective_terms(
            loss, metrics, self.objective, pred_velocity, target_velocity, hidden, self.align_depth
        )
        for k, (h, z) in enumerate(zip(projections, target_tokens)):
            metrics[f"cos_sim_{k}"] = token_cosine(h.detach(), z).mean()  # over [CLS; patches]
        metrics["loss"] = loss.detach()
        return GroupLoss(self.model_group.name, loss, metrics)

    @staticmethod
    def _resampled(targets: torch.Tensor, num_patches: int) -> torch.Tensor:
        """(B, 1 + T_enc, D) -> (B, 1 + num_patches, D): the patches interpolated on their grid,
        the class token as it is."""
        if targets.shape[1] - 1 == num_patches:
            return targets
        return torch.cat([targets[:, :1], resample_tokens(targets[:, 1:], num_patches)], dim=1)

    def _routed(
        self, targets: torch.Tensor, projected: torch.Tensor, route_ids: torch.Tensor
    ) -> torch.Tensor:
        """TREAD: targets (B, 1 + T, D) -> (B, 1 + K, D) when the projections are of the class
        token and the kept patches route_ids[:, :K] (unchanged when the tap sees every token)."""
        patches = routed_targets(targets[:, 1:], projected[:, 1:], route_ids, resample=False)
        return torch.cat([targets[:, :1], patches], dim=1)
