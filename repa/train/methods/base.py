"""The training-method protocol: what a method declares, and what the loop does with it.

A method declares its parameter groups (each a module's trainable parameters and the optimiser
that updates them, in update order), and for each micro-batch yields one loss per group. The
loop (repa/train/step.py) backpropagates each loss into its own group only, accumulates over
micro-batches, averages across processes, clips per group, agrees across ranks on non-finite
values and stop requests in one collective, and then steps every group, or none. A method never
calls backward() or step().

Besides the step maths a method owns: the checks it needs of a config (`check_config`), its
start-up (`build`: its modules and optimisers), the state that resumes it (`state_dict`) and
what it publishes at each checkpoint (`export`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from repa.config import ExperimentConfig
from repa.train.randomness import StepNoise


@dataclass
class ParamGroup:
    """Parameters that one optimiser updates, and how the loop clips them."""

    name: str  # "sit", "vae", "critic", ...; metrics log its grad norm as grad_norm_<name>
    module: nn.Module  # its trainable parameters are those with requires_grad when built
    optimizer: torch.optim.Optimizer
    max_grad_norm: float = 0.0  # 0 disables clipping
    learning_rate: Callable[[int], float] | None = None  # per step; None keeps the optimiser's
    params: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"parameter group {self.name!r} has no trainable parameters")


@dataclass
class GroupLoss:
    """One loss of a micro-batch and the group it updates. Metrics are detached scalars."""

    group: str
    loss: torch.Tensor  # scalar
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class MethodContext:
    """What a method is built from: the run's config and parts, on this process's device."""

    config: ExperimentConfig
    tokenizer: nn.Module
    encoders: Sequence[nn.Module]
    model: nn.Module  # the diffusion model, unwrapped (the loop wraps it for DDP / compile)
    device: torch.device
    world_size: int = 1
    # the EMA of `model` (frozen, eval mode; the loop moves it after each step and restores it on
    # resume): a method may read it, e.g. as a teacher (SRA). None where there is no EMA.
    ema_model: nn.Module | None = None
    start_step: int = 0  # the step the run starts from (a resumed checkpoint's step, else 0)


class TrainingMethod(abc.ABC):
    """Base class of training methods; see the module docstring for the protocol."""

    # options of the diffusion model this method needs (create_model keyword arguments)
    model_options: ClassVar[dict] = {}

    @classmethod  # noqa: B027 (optional hook)
    def check_config(cls, config: ExperimentConfig) -> None:
        """Raise ValueError for a config this method cannot train (no weights or data needed)."""

    @classmethod
    def needs_encoders(cls, config: ExperimentConfig, start_step: int) -> bool:
        """Whether a run starting at `start_step` runs the frozen encoders (default: whenever
        --encoder is set). When False the loop builds none (the model keeps its projectors, sized
        from the encoders' declared widths, so its checkpoints still load) and the context's
        encoders are empty."""
        return config.encoder.enabled

    @classmethod
    @abc.abstractmethod
    def build(cls, context: MethodContext) -> TrainingMethod:
        """The method's modules and optimisers, from the run's parts."""

    @abc.abstractmethod
    def groups(self) -> list[ParamGroup]:
        """Parameter groups in update order. The diffusion model's group is the one whose module
        is the context's model: the loop wraps it for DDP and keeps its EMA."""

    def batch_fields(self, cached: frozenset[str]) -> frozenset[str]:
        """The batch fields `losses` reads, given `cached`: those of "latents" and "features"
        that the shards hold for this run (made by its tokenizer / single encoder). The loop asks
        the data stream for these only (repa.data.stream.FIELDS); a field left out is None in
        every batch, and images left out are never read or decoded. Labels always come.
        Default: images and every cached field."""
        return frozenset({"images"}) | cached

    @abc.abstractmethod
    def losses(self, model: nn.Module, batch, noise: StepNoise) -> Iterator[GroupLoss]:
        """Yield one GroupLoss per group for this micro-batch, in update order. `model` is the
        diffusion model as the loop runs it (DDP-wrapped, compiled). The loop runs this
        generator under autocast and backpropagates each loss before asking for the next, so
        only one loss's graph is alive at a time. Draw every random tensor from `noise`."""

    def finish_step(self, updated: bool) -> None:  # noqa: B027 (optional hook)
        """Called once per optimiser step after the updates, before the EMA follows the model:
        for state that must move once per step rather than once per micro-batch. `updated` is
        False when the step was skipped or abandoned (an exception): drop the step's state."""

    def state_dict(self) -> dict:
        """State the method owns beyond its groups' optimisers (auxiliary modules, counters)."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 (optional hook)
        """Restore `state_dict()`'s output."""

    def export(self, ema_model: nn.Module, directory: Path) -> None:  # noqa: B027 (optional hook)
        """Files to publish in every checkpoint directory (main process only)."""
