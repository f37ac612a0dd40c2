"""sit / repa / ldm: loss = mean denoising loss + proj_coeff * alignment loss, one group (the SiT).

The three differ only in whether there are encoders and in which tokenizer and latent
normalisation are configured; the arithmetic is the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from repa.align import alignment_loss, resample_tokens, token_cosine
from repa.config import ExperimentConfig
from repa.models.tread import gather_tokens
from repa.train.methods.base import GroupLoss, MethodContext, ParamGroup, TrainingMethod
from repa.train.optim import adamw, lr_at
from repa.train.randomness import StepNoise
from repa.transport import create_time_sampler, denoising_loss, interpolate


def model_group(context: MethodContext) -> ParamGroup:
    """The diffusion model's group: AdamW at --learning-rate with its schedule, --max-grad-norm."""
    config = context.config
    params = [p for p in context.model.parameters() if p.requires_grad]
    return ParamGroup(
        "sit",
        context.model,
        adamw(params, config.optim.learning_rate, config),
        max_grad_norm=config.optim.max_grad_norm,
        learning_rate=lambda step: lr_at(step, config),
    )


def time_sampler_for(config: ExperimentConfig):
    transport = config.transport
    options = {}
    if transport.time_sampler != "uniform":
        options = {"location": transport.time_loc, "scale": transport.time_scale}
    return create_time_sampler(transport.time_sampler, **options)


def routed_targets(
    targets: torch.Tensor, projected: torch.Tensor, route_ids: torch.Tensor, resample: bool
) -> torch.Tensor:
    """TREAD: with the REPA tap inside the route the model projects only each sample's kept
    tokens, route_ids[:, :K] (K = projected.shape[1]); they align with the same-index targets.
    targets: (B, T_enc, D) -> (B, K, D); unchanged when the tap sees every token."""
    num_tokens, num_kept = route_ids.shape[1], projected.shape[1]
    if num_kept == num_tokens:
        return targets
    if targets.shape[1] != num_tokens:
        if not resample:
            raise ValueError(
                f"the model has {num_tokens} tokens but the encoder gives {targets.shape[1]}: match them "
                "or opt in to --align-resample"
            )
        targets = resample_tokens(targets, num_tokens)
    return gather_tokens(targets, route_ids[:, :num_kept])


class DenoisingMethod(TrainingMethod):
    def __init__(
        self,
        tokenizer: nn.Module,
        encoders: Sequence[nn.Module],
        path: str,
        time_sampler,
        proj_coeff: float,
        group: ParamGroup,
        resample_targets: bool = False,
        label_dropout: float = 0.0,
        routed_tokens: int = 0,
    ):
        self.tokenizer = tokenizer
        self.encoders = list(encoders)
        self.path = path
        self.time_sampler = time_sampler
        self.proj_coeff = proj_coeff if self.encoders else 0.0
        self.model_group = group
        self.resample_targets = resample_targets  # interpolate encoder tokens to the model's grid
        self.label_dropout = label_dropout  # classifier-free guidance training
        self.routed_tokens = routed_tokens  # TREAD: the model's token count when it routes, else 0

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        if config.method == "repa" and not config.encoder.enabled:
            raise ValueError("--method repa aligns to an encoder: set --encoder (e.g. dinov2-b), or use sit")
        if config.method == "sit" and config.encoder.enabled:
            raise ValueError("--method sit trains without alignment: use --encoder none, or --method repa")

    @classmethod
    def build(cls, context: MethodContext, **extra) -> DenoisingMethod:
        """`extra`: a subclass's own constructor arguments."""
        config = context.config
        return cls(
            context.tokenizer,
            context.encoders,
            config.transport.path_type,
            time_sampler_for(config),
            config.model.proj_coeff,
            model_group(context),
            resample_targets=config.model.align_resample,
            label_dropout=config.model.class_dropout_prob,
            routed_tokens=context.model.config.num_tokens if config.model.tread_ratio > 0 else 0,
            **extra,
        )

    def groups(self) -> list[ParamGroup]:
        return [self.model_group]

    def batch_fields(self, cached: frozenset[str]) -> frozenset[str]:
        """Cached latents and features when there are; images only for what is not cached (the
        tokenizer's moments, or an encoder run on the fly): REPA and SiT on cached latents and
        features never read a PNG."""
        fields = {"latents"} & cached
        if self.encoders and "features" in cached:
            fields.add("features")
        if "latents" not in fields or (self.encoders and "features" not in fields):
            fields.add("images")
        return frozenset(fields)

    @torch.no_grad()
    def target_tokens(self, batch, images: torch.Tensor | None, device=None) -> list[torch.Tensor]:
        """Per encoder (B, T, D_k), float32: the cached features when the batch carries them (the
        loop asks the stream for them only when this run's single encoder made them), else the
        frozen encoders run on the images, the largest cost a cache saves. `device`: where the
        cached features go (default: the images')."""
        if batch.features is not None and len(self.encoders) == 1:
            device = device if device is not None else images.device
            return [batch.features.to(device, non_blocking=True).float()]
        return [encoder(images).float() for encoder in self.encoders]

    def losses(self, model: nn.Module, batch, noise: StepNoise) -> Iterator[GroupLoss]:
        device = noise.device
        # None when everything the step needs is cached (see batch_fields)
        images = None if batch.images is None else batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        with torch.no_grad():
            if batch.moments is not None:  # cached moments are sampled fresh each step, as REPA does
                moments = batch.moments.to(device, non_blocking=True).float()
            else:
                moments = self.tokenizer.encode_moments(images)
            mean = moments.chunk(2, dim=1)[0]
            eps = noise.normal("posterior", tuple(mean.shape[1:]), dtype=mean.dtype)
            latents = self.tokenizer.normalize(self.tokenizer.sample(moments, noise=eps)).float()
            target_tokens = self.target_tokens(batch, images, device)
        yield self.model_loss(model, latents, labels, target_tokens, noise)

    def model_loss(
        self,
        model: nn.Module,
        latents: torch.Tensor,  # (B, C, h, w) normalised, no gradient
        labels: torch.Tensor,  # (B,)
        target_tokens: list[torch.Tensor],
        noise: StepNoise,
    ) -> GroupLoss:
        """The diffusion model's loss: denoising + proj_coeff * alignment, on times, noise,
        label dropout and TREAD's token permutations drawn from `noise` (names "t", "noise",
        "label_drop", "route")."""
        t = noise.draw("t", lambda n, g: self.time_sampler(n, self.path, generator=g, device=noise.device))
        eps = noise.normal("noise", tuple(latents.shape[1:]), dtype=latents.dtype)
        x_t, target_velocity = interpolate(self.path, latents, eps, t)
        drop = noise.uniform("label_drop") < self.label_dropout if self.label_dropout > 0 else None
        route = {}
        if self.routed_tokens:
            route["route_ids"] = noise.permutations("route", self.routed_tokens)  # (B, T)
        pred_velocity, projections = model(x_t, t, labels, force_drop_ids=drop, **route)
        if route and self.encoders:
            target_tokens = [
                routed_targets(z, h, route["route_ids"], self.resample_targets)
                for h, z in zip(projections, target_tokens)
            ]
        denoise = denoising_loss(pred_velocity, target_velocity).mean()
        metrics = {"loss_denoise": denoise.detach()}
        loss = denoise
        if self.encoders:
            align = alignment_loss(projections, target_tokens, resample=self.resample_targets)
            loss = denoise + self.proj_coeff * align
            metrics["loss_align"] = align.detach()
            # mean cosine per encoder, the figure papers plot (0.6-0.75 is normal for REPA)
            for k, (h, z) in enumerate(zip(projections, target_tokens)):
                if self.resample_targets and z.shape[1] != h.shape[1]:
                    z = resample_tokens(z, h.shape[1])
                metrics[f"cos_sim_{k}"] = token_cosine(h.detach(), z).mean()
        metrics["loss"] = loss.detach()
        return GroupLoss(self.model_group.name, loss, metrics)
