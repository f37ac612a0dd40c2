"""sit / repa / ldm: loss = mean denoising loss + proj_coeff * alignment loss, one group (the SiT).

The three differ only in whether there are encoders and in which tokenizer and latent
normalisation are configured; the arithmetic is the same. The objective options
(docs/objectives.md) add terms to it: LightningDiT's velocity-direction term, the dispersive loss
(--method dispersive), iREPA's conv projector and target z-score, shuffled targets (control),
HASTE's end of alignment; SRA (sra.py) adds its self-alignment through `extra_terms`. Modules
used only in training (conv projectors, SRA's head) form a second group, "heads".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from repa.align import (
    alignment_loss,
    attention_distillation_loss,
    derangement,
    resample_tokens,
    spatial_zscore,
    token_cosine,
)
from repa.config import ExperimentConfig, ObjectiveOptions
from repa.models.tread import gather_tokens
from repa.train.methods.base import GroupLoss, MethodContext, ParamGroup, TrainingMethod
from repa.train.methods.objectives import (
    AttentionTaps,
    BlockTaps,
    add_objective_terms,
    check_objectives,
    heads_group,
)
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
    # a subclass with its own `losses` that yields `heads_loss()` (REPA-E) may have heads
    own_losses_train_heads: bool = False

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
        *,
        objective: ObjectiveOptions | None = None,  # docs/objectives.md; None: all off
        align_depth: int = 8,
        start_step: int = 0,
        text_conditioned: bool = False,
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
        self.objective = objective if objective is not None else ObjectiveOptions()
        self.align_depth = align_depth
        self.step = start_step  # steps finished (HASTE's --align-until-step counts them)
        # a text model (cross-attention, MMDiT): the step reads each sample's cached caption
        # embedding and mask (the "text" field) and passes them as context, no labels
        self.text_conditioned = text_conditioned
        self.taps: BlockTaps | None = None  # hooks on the blocks whose outputs a term reads
        self.conv_projectors: nn.ModuleList | None = None  # iREPA, one per encoder
        self.heads_group: ParamGroup | None = None
        # HASTE's attention distillation: the SiT's and the (first) encoder's attention logits
        self.student_attention: AttentionTaps | None = None
        self.teacher_attention: AttentionTaps | None = None
        self._teacher_logits: dict[int, torch.Tensor] = {}
        # this micro-batch's terms of the heads' loss, each computed again from detached inputs
        self._head_terms: list[Callable[[], torch.Tensor]] = []

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        if config.method == "repa" and not config.encoder.enabled:
            raise ValueError("--method repa aligns to an encoder: set --encoder (e.g. dinov2-b), or use sit")
        if config.method == "sit" and config.encoder.enabled:
            raise ValueError("--method sit trains without alignment: use --encoder none, or --method repa")
        if config.method == "dispersive" and not config.objective.dispersive_weight > 0:
            raise ValueError("--method dispersive needs --dispersive-weight > 0 (the DDT code's: 0.5)")
        check_objectives(config, config.method)

    @classmethod
    def needs_encoders(cls, config: ExperimentConfig, start_step: int) -> bool:
        """HASTE: a run that starts at or past --align-until-step never aligns again."""
        until = config.objective.align_until_step
        return config.encoder.enabled and not (until and start_step >= until)

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
            objective=config.objective,
            align_depth=config.model.align_depth,
            start_step=context.start_step,
            text_conditioned=bool(getattr(context.model.config, "context_dim", 0)),
            **extra,
        )._with_objectives(context)

    def _with_objectives(self, context: MethodContext) -> DenoisingMethod:
        """The taps and training-only heads the objective options need. Returns self."""
        objective = self.objective
        cls = type(self)
        own_step = [
            name
            for name in ("losses", "model_loss", "extra_terms")
            if getattr(cls, name) is not getattr(DenoisingMethod, name)
        ]
        if self.text_conditioned and own_step:  # their own forwards pass labels, not the captions
            raise ValueError(
                f"--method {context.config.method} does not train text models (its own "
                f"{', '.join(own_step)}): use sit, repa or dispersive on captioned shards, or --context-dim 0"
            )
        heads = self.make_heads(context)
        own_losses = type(self).losses is not DenoisingMethod.losses  # e.g. REPA-E's VAE step
        untrained_heads = heads and not self.own_losses_train_heads
        if own_losses and (
            untrained_heads or objective.align_until_step or objective.align_target != "encoder"
        ):
            raise ValueError(
                f"--method {context.config.method} yields its own losses, which do not "
                + ("train the method's heads (--projector conv), " if untrained_heads else "")
                + "stop aligning (--align-until-step) or shuffle its other alignment's targets "
                "(--align-target): leave those options off"
            )
        if heads:
            self.heads = nn.ModuleDict(heads).to(context.device)
            self.heads_group = heads_group(context, self.heads)
            self.conv_projectors = heads.get("projectors")
        depths = self.tap_depths()
        if depths:
            self.taps = BlockTaps(context.model, depths)
        if objective.attn_distill_weight > 0 and self.encoders:
            pairs = objective.attention_pairs()
            vit = getattr(self.encoders[0], "vit", None)
            if vit is None or not hasattr(vit, "blocks"):
                raise ValueError(
                    f"--attn-distill-weight needs a ViT encoder; {self.encoders[0].name} exposes no blocks"
                )
            self.student_attention = AttentionTaps(context.model.blocks, [s for s, _ in pairs], 0, "the SiT")
            self.teacher_attention = AttentionTaps(
                vit.blocks, [e for _, e in pairs], vit.num_prefix_tokens, f"encoder {self.encoders[0].name}"
            )
        return self

    def make_heads(self, context: MethodContext) -> dict[str, nn.Module]:
        """The method's training-only modules by name (a subclass adds its own): iREPA's conv
        projectors, one per encoder, when --projector conv."""
        from repa.models.projectors import ConvProjector
        from repa.train.setup import encoder_widths

        if self.objective.projector != "conv" or not context.config.encoder.enabled:
            return {}
        hidden = context.model.config.hidden_size
        widths = [encoder.dim for encoder in self.encoders] or encoder_widths(context.config)
        kernel = self.objective.projector_kernel
        return {"projectors": nn.ModuleList([ConvProjector(hidden, width, kernel) for width in widths])}

    def tap_depths(self) -> set[int]:
        """Blocks whose outputs the terms read (a subclass adds its own)."""
        depths = set()
        if self.objective.projector == "conv" and self.encoders:
            depths.add(self.align_depth)
        if self.objective.dispersive_weight > 0:
            depths.add(self.objective.dispersive_depth or self.align_depth)
        return depths

    def aligning(self) -> bool:
        """Whether this step has alignment terms: always, or until --align-until-step (HASTE)."""
        until = self.objective.align_until_step
        return not until or self.step < until

    def finish_step(self, updated: bool) -> None:
        self.step += 1  # skipped steps count too, as the loop's step does

    def groups(self) -> list[ParamGroup]:
        return [self.model_group] + ([self.heads_group] if self.heads_group is not None else [])

    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict()} if self.heads_group is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.heads_group is not None:
            if "heads" not in state:
                raise ValueError(
                    "the checkpoint holds no weights of this method's heads (--projector conv, SRA)"
                )
            self.heads.load_state_dict(state["heads"])

    def batch_fields(self, cached: frozenset[str]) -> frozenset[str]:
        """Cached latents and features when there are; images only for what is not cached (the
        tokenizer's moments, or an encoder run on the fly): REPA and SiT on cached latents and
        features never read a PNG."""
        fields = {"latents"} & cached
        if self.encoders and "features" in cached and self.teacher_attention is None:
            fields.add("features")
        if "latents" not in fields or (self.encoders and "features" not in fields):
            fields.add("images")
        if self.text_conditioned:
            fields.add("text")
        return frozenset(fields)

    @torch.no_grad()
    def target_tokens(self, batch, images: torch.Tensor | None, device=None) -> list[torch.Tensor]:
        """Per encoder (B, T, D_k), float32: the cached features when the batch carries them (the
        loop asks the stream for them only when this run's single encoder made them), else the
        frozen encoders run on the images, the largest cost a cache saves. `device`: where the
        cached features go (default: the images')."""
        if batch.features is not None and len(self.encoders) == 1 and self.teacher_attention is None:
            device = device if device is not None else images.device
            tokens = [batch.features.to(device, non_blocking=True).float()]
        elif self.teacher_attention is not None:  # HASTE: the encoder's attention too (never cached)
            with self.teacher_attention.capturing() as parts:
                tokens = [encoder(images).float() for encoder in self.encoders]
            self._teacher_logits = self.teacher_attention.logits(parts)  # (B, H_enc, T, T) per block
        else:
            tokens = [encoder(images).float() for encoder in self.encoders]
        if self.objective.target_norm == "zscore":  # iREPA: each image's spatial pattern
            tokens = [spatial_zscore(z, self.objective.target_norm_gamma) for z in tokens]
        return tokens

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
            # HASTE: no encoder forward once alignment has ended
            target_tokens = self.target_tokens(batch, images, device) if self.aligning() else []
        if self.text_conditioned:  # the caption conditions the model; labels are not used
            condition = {
                "context": batch.text.to(device, non_blocking=True).float(),  # (B, L, D)
                "context_mask": batch.text_mask.to(device, non_blocking=True),  # (B, L)
            }
            yield self.model_loss(model, latents, None, target_tokens, noise, condition=condition)
        else:
            yield self.model_loss(model, latents, labels, target_tokens, noise)
        heads_loss = self.heads_loss()
        if heads_loss is not None:
            yield heads_loss

    def heads_loss(self) -> GroupLoss | None:
        """The heads' loss of the last `model_loss`: their terms again, on the detached hidden
        states (None without heads). A subclass with its own `losses` yields it after the model's."""
        terms, self._head_terms = self._head_terms, []
        return GroupLoss(self.heads_group.name, sum(term() for term in terms)) if terms else None

    def model_loss(
        self,
        model: nn.Module,
        latents: torch.Tensor,  # (B, C, h, w) normalised, no gradient
        labels: torch.Tensor,  # (B,)
        target_tokens: list[torch.Tensor],
        noise: StepNoise,
        condition: dict[str, torch.Tensor] | None = None,
    ) -> GroupLoss:
        """The diffusion model's loss: denoising + proj_coeff * alignment, on times, noise,
        label dropout and TREAD's token permutations drawn from `noise` (names "t", "noise",
        "label_drop", "route"). `condition`: a text model's context and context_mask (labels
        None); the label dropout drops the caption to the null caption instead."""
        t = noise.draw("t", lambda n, g: self.time_sampler(n, self.path, generator=g, device=noise.device))
        eps = noise.normal("noise", tuple(latents.shape[1:]), dtype=latents.dtype)
        x_t, target_velocity = interpolate(self.path, latents, eps, t)
        drop = noise.uniform("label_drop") < self.label_dropout if self.label_dropout > 0 else None
        route = {}
        if self.routed_tokens:
            route["route_ids"] = noise.permutations("route", self.routed_tokens)  # (B, T)
        self._head_terms = []
        aligning = bool(self.encoders) and self.aligning()
        distilling = aligning and self.student_attention is not None
        with (
            self.taps.capturing() if self.taps is not None else contextlib.nullcontext({}) as hidden,
            self.student_attention.capturing() if distilling else contextlib.nullcontext({}) as attention,
        ):
            pred_velocity, projections = model(
                x_t, t, labels, force_drop_ids=drop, **(condition or {}), **route
            )
        unused_projections = projections if not aligning else []
        if aligning and self.objective.align_target == "shuffled":
            # control arm: every sample aligns to another sample's tokens (a seeded random cycle)
            source = derangement(noise.uniform("align_shuffle"))
            target_tokens = [z[source] for z in target_tokens]
        if aligning and self.conv_projectors is not None:
            tapped = hidden[self.align_depth]  # (B, T, D)
            projections = [projector(tapped) for projector in self.conv_projectors]
            targets, coeff, resample = target_tokens, self.proj_coeff, self.resample_targets
            projectors = self.conv_projectors
            self._head_terms.append(
                lambda: (
                    coeff
                    * alignment_loss([p(tapped.detach()) for p in projectors], targets, resample=resample)
                )
            )
        if route and aligning:
            target_tokens = [
                routed_targets(z, h, route["route_ids"], self.resample_targets)
                for h, z in zip(projections, target_tokens)
            ]
        denoise = denoising_loss(pred_velocity, target_velocity).mean()
        metrics = {"loss_denoise": denoise.detach()}
        loss = denoise
        objective = self.objective
        loss = add_objective_terms(
            loss, metrics, objective, pred_velocity, target_velocity, hidden, self.align_depth
        )
        if distilling:  # HASTE: mean over the block pairs of the attention cross-entropy
            student_logits, teacher_logits = self.student_attention.logits(attention), self._teacher_logits
            terms = []
            for student, teacher in objective.attention_pairs():
                s, z = student_logits[student], teacher_logits[teacher]
                heads = min(s.shape[1], z.shape[1])  # HASTE: the SiT's first 12 of 16 heads
                terms.append(attention_distillation_loss(s[:, :heads], z[:, :heads]))
            distil = torch.stack(terms).mean()
            loss = loss + objective.attn_distill_weight * distil
            metrics["loss_attn"] = distil.detach()
        extra, extra_metrics = self.extra_terms(hidden, latents, eps, t, labels, drop, noise)
        if extra is not None:
            loss = loss + extra
            metrics.update(extra_metrics)
        if unused_projections:
            # alignment has ended (or there is no encoder here): a zero-weighted use keeps every
            # parameter in DDP's reduction, the zero gradient a lone process gives them anyway
            loss = loss + 0.0 * sum(h.float().sum() for h in unused_projections)
        if aligning:
            align = alignment_loss(projections, target_tokens, resample=self.resample_targets)
            loss = loss + self.proj_coeff * align
            metrics["loss_align"] = align.detach()
            # mean cosine per encoder, the figure papers plot (0.6-0.75 is normal for REPA)
            for k, (h, z) in enumerate(zip(projections, target_tokens)):
                if self.resample_targets and z.shape[1] != h.shape[1]:
                    z = resample_tokens(z, h.shape[1])
                metrics[f"cos_sim_{k}"] = token_cosine(h.detach(), z).mean()
        metrics["loss"] = loss.detach()
        return GroupLoss(self.model_group.name, loss, metrics)

    def extra_terms(
        self,
        hidden: dict[int, torch.Tensor],  # tapped block outputs (B, T, D) of this forward
        latents: torch.Tensor,  # (B, C, h, w) clean
        eps: torch.Tensor,  # the forward's noise
        t: torch.Tensor,  # (B,)
        labels: torch.Tensor,
        drop: torch.Tensor | None,  # the forward's label dropout
        noise: StepNoise,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """A subclass's own terms of the diffusion model's loss (weighted) and their metrics."""
        return None, {}
