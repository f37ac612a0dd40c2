"""Parameter and FLOP counting.

Convention: one multiply-add is one FLOP, as in the DiT paper (and fvcore, which it used), so
figures compare directly with published tables. Attention's two matrix products are included.
Counting runs torch's FlopCounterMode; attention is forced onto the "math" SDPA kernel, whose
matrix products the counter sees (the fused CPU kernel is invisible to it). Build models on the
`meta` device to count without allocating or computing anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """Multiply-adds of one call fn(*args, **kwargs) (no gradients)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn(*args, **kwargs)
    # FlopCounterMode counts a multiply-add as two FLOPs.
    return counter.get_total_flops() // 2


def count_parameters(module: nn.Module) -> int:
    """All parameters, trainable or not (the fixed position embedding included, as DiT counts)."""
    return sum(p.numel() for p in module.parameters())


@dataclass
class ModelCost:
    name: str
    resolution: int
    latent_size: int
    parameters: int
    flops: int  # multiply-adds of one forward pass for one image (a training pass under TREAD)
    adaln_parameters: int  # parameters in adaLN modulation layers (blocks and final layer)

    @property
    def adaln_share(self) -> float:
        return self.adaln_parameters / self.parameters


def is_adaln_parameter(name: str) -> bool:
    """adaLN modulation: per-block and final-layer `adaLN_modulation`, adaLN-single's shared
    `t_block` and its per-block `scale_shift_table`."""
    name = f".{name}"
    return any(part in name for part in (".adaLN_modulation.", ".t_block.", ".scale_shift_table"))


def model_cost(
    name: str, resolution: int = 256, latent_downsample: int = 8, latent_channels: int = 4, **overrides
) -> ModelCost:
    """Parameters and forward FLOPs of a registered diffusion model for images of `resolution`.

    The model is built on the meta device, so even XL sizes cost nothing to count. `overrides`
    are SiTConfig fields (e.g. adaln="single", swiglu=True). With context_dim the pass
    cross-attends to a full context of context_length tokens (PixArt's T5: 120). With
    tread_ratio > 0 the count is of a training forward pass (train mode, routed); sampling runs
    the plain network, whose count is the model's without TREAD.
    """
    from repa.models import create_model

    if resolution % latent_downsample:
        raise ValueError(
            f"resolution {resolution} is not divisible by the latent downsampling {latent_downsample}"
        )
    latent_size = resolution // latent_downsample
    with torch.device("meta"):
        model = create_model(name, input_size=latent_size, in_channels=latent_channels, **overrides).eval()
        latents = torch.zeros(1, latent_channels, latent_size, latent_size)
        t = torch.zeros(1)
        config = model.config
        labels = torch.zeros(1, dtype=torch.long) if config.num_classes else None
        condition = {}
        if config.context_dim:
            condition["context"] = torch.zeros(1, config.context_length, config.context_dim)
    if config.tread_ratio > 0:
        model.train()  # TREAD routes in training only
        flops = count_flops(lambda: model(latents, t, labels, **condition))
    else:
        flops = count_flops(model.velocity, latents, t, labels, **condition)
    adaln = sum(p.numel() for module_name, p in model.named_parameters() if is_adaln_parameter(module_name))
    return ModelCost(name, resolution, latent_size, count_parameters(model), flops, adaln)
