"""The representation objectives a denoising method adds to its loss (docs/objectives.md):
block taps, the checks of their options, and the method-owned heads' parameter group.

Hidden states are read with forward hooks on the model's `blocks`, registered once when the
method is built, so the model's forward (DDP-wrapped, compiled, with TREAD or cross-attention)
stays the one the loop runs; a teacher's forward is cut after its block by a hook that stops it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from repa.config import ExperimentConfig
from repa.train.methods.base import MethodContext, ParamGroup
from repa.train.optim import adamw, lr_at


class BlockTaps:
    """Outputs of chosen blocks (1-based depths) of `model` during `capturing()`.

    The hooks stay registered (a torch.compile'd model is not recompiled each step) and record
    only inside `capturing()`, and only for these block objects: a copy of the model (the EMA,
    made by deepcopy after the hooks exist) runs without writing here."""

    def __init__(self, model: nn.Module, depths: Iterable[int]):
        self.depths = sorted(set(depths))
        self.outputs: dict[int, torch.Tensor] | None = None
        blocks = model.blocks
        for depth in self.depths:
            if not 1 <= depth <= len(blocks):
                raise ValueError(f"block {depth} does not exist: the model has blocks 1..{len(blocks)}")
            block = blocks[depth - 1]
            block.register_forward_hook(self._recorder(block, depth))

    def _recorder(self, block: nn.Module, depth: int):
        def record(module, args, output):
            if self.outputs is not None and module is block:
                self.outputs[depth] = output  # (B, T, D), with its graph

        return record

    @contextlib.contextmanager
    def capturing(self) -> Iterator[dict[int, torch.Tensor]]:
        self.outputs = {}
        try:
            yield self.outputs
        finally:
            self.outputs = None


class AttentionTaps:
    """Pre-softmax attention logits (B, H, T', T') of chosen blocks (1-based) during
    `capturing()`, read off the attention modules' q_norm / k_norm outputs (identity modules when
    there is no qk-norm), rotated by the RoPE the attention was given, times head_dim^-1/2, with
    the first `prefix_tokens` tokens (an encoder's class and register tokens) dropped on both
    axes. Works for repa's Attention and timm's. As BlockTaps: hooks stay, record only inside
    `capturing()` and only for these modules."""

    def __init__(self, blocks, depths: Iterable[int], prefix_tokens: int = 0, what: str = "the model"):
        self.depths = sorted(set(depths))
        self.prefix_tokens = prefix_tokens
        self.parts: dict[int, dict] | None = None
        for depth in self.depths:
            if not 1 <= depth <= len(blocks):
                raise ValueError(f"block {depth} of {what} does not exist: it has blocks 1..{len(blocks)}")
            attention = blocks[depth - 1].attn
            attention.register_forward_pre_hook(self._recorder(attention, depth, "rope"), with_kwargs=True)
            attention.q_norm.register_forward_hook(self._recorder(attention.q_norm, depth, "q"))
            attention.k_norm.register_forward_hook(self._recorder(attention.k_norm, depth, "k"))

    def _recorder(self, owner: nn.Module, depth: int, part: str):
        if part == "rope":  # repa's Attention.forward(x, rope); timm's takes none

            def record_rope(module, args, kwargs):
                if self.parts is not None and module is owner:
                    self.parts.setdefault(depth, {})["rope"] = (
                        args[1] if len(args) > 1 else kwargs.get("rope")
                    )

            return record_rope

        def record(module, args, output):
            if self.parts is not None and module is owner:
                self.parts.setdefault(depth, {})[part] = output  # (B, heads, T, head_dim)

        return record

    @contextlib.contextmanager
    def capturing(self) -> Iterator[dict[int, dict]]:
        self.parts = {}
        try:
            yield self.parts
        finally:
            self.parts = None

    def logits(self, parts: dict[int, dict]) -> dict[int, torch.Tensor]:
        """What `capturing()` recorded, as logits per block: (B, heads, T', T')."""
        logits = {}
        for depth in self.depths:
            if depth not in parts or "q" not in parts[depth]:
                raise RuntimeError(f"block {depth}'s attention did not run in the captured forward")
            q, k, rope = parts[depth]["q"], parts[depth]["k"], parts[depth].get("rope")
            if rope is not None:
                q, k = rope(q), rope(k)
            p = self.prefix_tokens
            q, k = q[:, :, p:].float(), k[:, :, p:].float()
            logits[depth] = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        return logits


class _Reached(Exception):
    def __init__(self, output: torch.Tensor):
        self.output = output


def run_until_block(model: nn.Module, depth: int, *args, **kwargs) -> torch.Tensor:
    """The output of block `depth` (1-based) of model(*args, **kwargs), the blocks after it never
    run; with its graph when gradients are enabled (REPA-E's VAE step with iREPA's conv
    projector aligns through it)."""

    def stop(module, inputs, output):
        raise _Reached(output)

    handle = model.blocks[depth - 1].register_forward_hook(stop)
    try:
        model(*args, **kwargs)
    except _Reached as reached:
        return reached.output
    finally:
        handle.remove()
    raise RuntimeError(f"the model's forward never ran block {depth}")


@torch.no_grad()
def block_output(model: nn.Module, depth: int, *args, **kwargs) -> torch.Tensor:
    """run_until_block without gradient (SRA's teacher needs nothing else)."""
    return run_until_block(model, depth, *args, **kwargs)


def model_depth(config: ExperimentConfig) -> int:
    from repa.models import config_for

    return config_for(config.model.name, **config.model_overrides(input_size=None)).depth


def check_objectives(config: ExperimentConfig, method: str, self_aligned: bool = False) -> None:
    """The objective options' checks across sections (no weights or data needed). `self_aligned`:
    the method has an alignment term without an encoder (SRA), which --align-until-step ends."""
    objective, aligned = config.objective, config.encoder.enabled
    needs_encoder = {
        "--align-target shuffled": objective.align_target == "shuffled",
        "--projector conv": objective.projector == "conv",
        "--target-norm zscore": objective.target_norm != "none",
        "--align-until-step": objective.align_until_step > 0 and not self_aligned,
    }
    for flag, used in needs_encoder.items():
        if used and not aligned:
            raise ValueError(
                f"{flag} changes the alignment to an encoder, but --method {method} has none: set --encoder"
            )
    depth = model_depth(config)
    if objective.projector == "conv" and not 1 <= config.model.align_depth <= depth:
        raise ValueError(
            f"--align-depth {config.model.align_depth} is out of range: the model has blocks 1..{depth}"
        )
    if objective.attn_distill_weight > 0:
        if not aligned:
            raise ValueError(
                f"--attn-distill-weight distils an encoder's attention, but --method {method} has none"
            )
        for student, _ in objective.attention_pairs():
            if student > depth:
                raise ValueError(
                    f"--attn-distill-layers names block {student} of the SiT, which has blocks 1..{depth}"
                )
    dispersive = objective.dispersive_depth or config.model.align_depth
    if objective.dispersive_weight > 0 and not 1 <= dispersive <= depth:
        raise ValueError(
            f"--dispersive-depth {dispersive} is out of range: the model has blocks 1..{depth} (0 means "
            "--align-depth)"
        )


def heads_group(context: MethodContext, heads: nn.Module) -> ParamGroup:
    """The group of the method's training-only modules (iREPA's conv projectors, SRA's head):
    AdamW at --learning-rate with its schedule, clipped to --max-grad-norm on their own. They are
    not part of the diffusion model, so the EMA file and sampling never see them."""
    config = context.config
    params = [p for p in heads.parameters() if p.requires_grad]
    return ParamGroup(
        "heads",
        heads,
        adamw(params, config.optim.learning_rate, config),
        max_grad_norm=config.optim.max_grad_norm,
        learning_rate=lambda step: lr_at(step, config),
    )


def add_objective_terms(
    loss: torch.Tensor,
    metrics: dict[str, torch.Tensor],
    objective,
    pred_velocity: torch.Tensor,
    target_velocity: torch.Tensor,
    hidden: dict,
    align_depth: int,
) -> torch.Tensor:
    """`loss` plus the weighted terms the objective options ask for, each one's value logged in
    `metrics`: LightningDiT's velocity direction (`loss_cos`) and the dispersive loss on block
    --dispersive-depth, default the REPA tap (`loss_dispersive`). One place for both the
    denoising and REG steps. hidden: block depth -> hidden tokens (B, T, D), from BlockTaps."""
    from repa.align import dispersive_loss
    from repa.transport.objective import velocity_direction_loss

    if objective.cos_loss_weight > 0:
        direction = velocity_direction_loss(pred_velocity, target_velocity).mean()
        loss = loss + objective.cos_loss_weight * direction
        metrics["loss_cos"] = direction.detach()
    if objective.dispersive_weight > 0:
        hidden_state = hidden[objective.dispersive_depth or align_depth]
        disperse = dispersive_loss(hidden_state, objective.dispersive_temperature)
        loss = loss + objective.dispersive_weight * disperse
        metrics["loss_dispersive"] = disperse.detach()
    return loss
