"""Optimisers and learning-rate schedules, shared by every training method."""

from __future__ import annotations

import math

import torch

from repa.config import ExperimentConfig


def adamw(params, lr: float, config: ExperimentConfig) -> torch.optim.AdamW:
    """AdamW with the run's betas, weight decay and epsilon (fused: one kernel for all tensors)."""
    optim = config.optim
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=(optim.adam_beta1, optim.adam_beta2),
        weight_decay=optim.adam_weight_decay,
        eps=optim.adam_epsilon,
        fused=True,
    )


def lr_at(step: int, config: ExperimentConfig) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warmup, then constant or cosine.
    A function of the step, so resuming needs no scheduler state."""
    optim, total = config.optim, max(config.run.max_train_steps, 1)
    base = optim.learning_rate
    if optim.lr_warmup_steps and step < optim.lr_warmup_steps:
        return base * (step + 1) / optim.lr_warmup_steps
    if optim.lr_schedule == "cosine":
        progress = (step - optim.lr_warmup_steps) / max(total - optim.lr_warmup_steps, 1)
        return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return base
