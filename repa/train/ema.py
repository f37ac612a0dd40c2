"""Exponential moving average of a model's parameters and floating-point buffers.

One fused multi-tensor lerp per update (torch._foreach_lerp_), not a Python loop with two small
kernels per tensor as in the reference code. Buffers count too: REPA-E's BatchNorm running
statistics must be averaged, since the exported E2E-VAE statistics are read from the EMA model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * model, for every float parameter and buffer.

    Integer buffers (e.g. BatchNorm's num_batches_tracked) are copied. The averaged weights
    live in `self.model`, a frozen copy in eval mode with the same state-dict keys as the source,
    so it can be sampled from and saved directly.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @staticmethod
    def _split(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tensors = [p.detach() for p in model.parameters()] + list(model.buffers())
        floats = [t for t in tensors if t.is_floating_point()]
        others = [t for t in tensors if not t.is_floating_point()]
        return floats, others

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """Move the average towards `model` (the unwrapped online model)."""
        decay = self.decay if decay is None else decay
        ema_floats, ema_others = self._split(self.model)
        floats, others = self._split(model)
        if len(ema_floats) != len(floats) or len(ema_others) != len(others):
            raise ValueError("EMA and model have different structures")
        torch._foreach_lerp_(ema_floats, floats, 1.0 - decay)
        for ema_tensor, tensor in zip(ema_others, others):
            ema_tensor.copy_(tensor)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Reset the average to the model's current weights (decay 0)."""
        self.update(model, decay=0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)
