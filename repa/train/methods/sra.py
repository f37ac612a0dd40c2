"""sra: Self-Representation Alignment (SRA): the model's own EMA is the teacher, at less noise.

    loss = denoising + sra_weight * (1 - cos(head(h_s), h_T))   [+ REPA's term with --encoder]

h_s: the output of block --sra-student-depth of the training forward (x_t at t); head: Linear(D,
2D), SiLU, Linear(2D, D), a training-only module of this method (group "heads"; it never enters
the SiT, its EMA file or sampling); h_T: the output of block --sra-teacher-depth of the EMA model
(eval mode, no gradient, the blocks after it never run) on the same image, noise and dropped
labels at t_T = clamp(t - sra_t_max * U(0, 1), 0, 1) (U drawn as "sra_t"). The cosine is per
token by default; --sra-cosine token-axis is SRA's published code (see repa.align).
--align-until-step ends the term too. Facts and defaults: docs/objectives.md.
"""

from __future__ import annotations

import torch
from torch import nn

from repa.align import self_alignment_loss, token_cosine
from repa.config import ExperimentConfig
from repa.train.methods.base import MethodContext
from repa.train.methods.denoising import DenoisingMethod
from repa.train.methods.objectives import block_output, check_objectives, model_depth
from repa.train.randomness import StepNoise
from repa.transport import interpolate


def sra_head(hidden_size: int) -> nn.Sequential:
    """SRA's `ap_head`: Linear(D, 2D), SiLU, Linear(2D, D)."""
    return nn.Sequential(
        nn.Linear(hidden_size, 2 * hidden_size), nn.SiLU(), nn.Linear(2 * hidden_size, hidden_size)
    )


class SRAMethod(DenoisingMethod):
    def __init__(self, *args, teacher: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher  # the EMA model: frozen, moved by the loop after each step

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        check_objectives(config, config.method, self_aligned=True)
        objective, depth = config.objective, model_depth(config)
        for flag, block in (
            ("--sra-student-depth", objective.sra_student_depth),
            ("--sra-teacher-depth", objective.sra_teacher_depth),
        ):
            if not 1 <= block <= depth:
                raise ValueError(
                    f"{flag} {block} is out of range: the model has blocks 1..{depth} (SRA for SiT-XL/2: 8 "
                    "and 20; its code's defaults: 4 and 8)"
                )

    @classmethod
    def build(cls, context: MethodContext) -> SRAMethod:
        if context.ema_model is None:
            raise ValueError("--method sra needs the EMA model as its teacher (MethodContext.ema_model)")
        return super().build(context, teacher=context.ema_model)

    def make_heads(self, context: MethodContext) -> dict[str, nn.Module]:
        return {**super().make_heads(context), "sra_head": sra_head(context.model.config.hidden_size)}

    def tap_depths(self) -> set[int]:
        return super().tap_depths() | {self.objective.sra_student_depth}

    def extra_terms(self, hidden, latents, eps, t, labels, drop, noise: StepNoise):
        objective = self.objective
        if not self.aligning():
            return None, {}
        student = hidden[objective.sra_student_depth]  # (B, T, D), with gradient
        t_teacher = (t - objective.sra_t_max * noise.uniform("sra_t")).clamp(0, 1)
        x_teacher, _ = interpolate(self.path, latents, eps, t_teacher)
        teacher = block_output(
            self.teacher, objective.sra_teacher_depth, x_teacher, t_teacher, labels, force_drop_ids=drop
        ).float()  # (B, T, D), no gradient
        if student.shape != teacher.shape:
            raise ValueError(
                f"SRA's student block gives {tuple(student.shape)} but the teacher's {tuple(teacher.shape)}: "
                "with TREAD, keep --sra-student-depth outside the route"
            )
        head, form, weight = self.heads["sra_head"], objective.sra_cosine, objective.sra_weight
        predicted = head(student)
        loss = self_alignment_loss(predicted, teacher, form)
        self._head_terms.append(lambda: weight * self_alignment_loss(head(student.detach()), teacher, form))
        with torch.no_grad():
            cosine = token_cosine(predicted.detach(), teacher).mean()
        return weight * loss, {"loss_sra": loss.detach(), "cos_sim_sra": cosine}
