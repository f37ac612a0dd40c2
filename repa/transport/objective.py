"""The flow-matching training objective: which times to train on, and the denoising loss.

In one function (`sample_training_inputs`, drawing from one generator):

    t, noise, x_t, target_velocity = sample_training_inputs(latents, path, time_sampler)
    loss = denoising_loss(model(x_t, t, labels), target_velocity).mean()
    # + w * velocity_direction_loss(...).mean() with --cos-loss-weight w (LightningDiT: 1)

The training loop draws t and noise itself, per name for the whole step (repa/train/randomness.py),
and then calls `interpolate` and `denoising_loss` (repa/train/methods/denoising.py).

Time samplers (by name, see `create_time_sampler`):
  "uniform"       t ~ U[0, 1)
  "logit-normal"  log(sigma_t / alpha_t) ~ N(location, scale^2). On the linear path this is
                  t = sigmoid(N(location, scale^2)), the logit-normal distribution; on the cosine
                  path t = (2/pi) atan(exp(N(location, scale^2))). REPA's "lognormal" (its
                  misnamed `--weighting` flag; there is no loss weighting) is this with (0, 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from repa.transport.paths import PathType, interpolate, parse_path


class TimeSampler(Protocol):
    """Draws training times in [0, 1] (t=0 data, t=1 noise) for a batch."""

    def __call__(
        self,
        batch_size: int,
        path: PathType | str,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:  # (batch_size,) float32
        ...


@dataclass(frozen=True)
class UniformTime:
    """t ~ U[0, 1), the same for every path."""

    def __call__(self, batch_size, path, *, generator=None, device=None) -> Tensor:
        parse_path(path)
        return torch.rand(batch_size, generator=generator, device=device)


@dataclass(frozen=True)
class LogitNormalTime:
    """log(sigma_t / alpha_t) ~ N(location, scale^2): logit-normal t on the linear path.

    The noise-to-signal ratio sigma_t / alpha_t is t / (1 - t) on the linear path and
    tan(pi t / 2) on the cosine path, so the same draw maps to t through the inverse of each.
    """

    location: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"logit-normal scale must be > 0, got {self.scale}")

    def __call__(self, batch_size, path, *, generator=None, device=None) -> Tensor:
        log_ratio = self.location + self.scale * torch.randn(batch_size, generator=generator, device=device)
        if parse_path(path) is PathType.LINEAR:
            # t = ratio / (1 + ratio), written as a sigmoid so that large |log_ratio| cannot overflow
            return torch.sigmoid(log_ratio)
        return (2 / math.pi) * torch.atan(torch.exp(log_ratio))


TIME_SAMPLERS: dict[str, type] = {"uniform": UniformTime, "logit-normal": LogitNormalTime}
# Other spellings in use: REPA's flag value, and the underscore form.
TIME_SAMPLER_ALIASES: dict[str, str] = {"lognormal": "logit-normal", "logit_normal": "logit-normal"}


def create_time_sampler(name: str, **kwargs) -> TimeSampler:
    """Build a time sampler by name ("uniform", "logit-normal" alias "lognormal").

    Keyword arguments go to the sampler (`location`, `scale` for logit-normal).
    """
    key = TIME_SAMPLER_ALIASES.get(name.lower(), name.lower())
    if key not in TIME_SAMPLERS:
        choices = ", ".join(repr(n) for n in [*TIME_SAMPLERS, *TIME_SAMPLER_ALIASES])
        raise ValueError(f"unknown time sampler {name!r}; valid choices: {choices}")
    try:
        return TIME_SAMPLERS[key](**kwargs)
    except TypeError as error:
        raise ValueError(f"bad arguments {kwargs} for time sampler {key!r}: {error}") from None


def denoising_loss(pred_velocity: Tensor, target_velocity: Tensor) -> Tensor:
    """Per-sample mean over all non-batch dimensions of the squared error, shape (B,).

    Computed in float32 even for bf16/fp16 predictions. The caller takes the batch mean (REPA's
    loss is this averaged over the batch).
    """
    if pred_velocity.shape != target_velocity.shape:
        raise ValueError(
            f"prediction {tuple(pred_velocity.shape)} and target {tuple(target_velocity.shape)} "
            "must have the same shape"
        )
    squared_error = (pred_velocity.float() - target_velocity.float()).square()
    return squared_error.flatten(1).mean(dim=1)


def velocity_direction_loss(pred_velocity: Tensor, target_velocity: Tensor) -> Tensor:
    """LightningDiT's velocity-direction term, per sample (B,): 1 - cos between predicted and
    target velocity over the channels at each pixel, averaged over the pixels (its
    `use_cosine_loss`, added to the squared error with weight 1). Unchanged by the time
    convention (both velocities flip sign together). float32, as `denoising_loss`."""
    if pred_velocity.shape != target_velocity.shape:
        raise ValueError(
            f"prediction {tuple(pred_velocity.shape)} and target {tuple(target_velocity.shape)} "
            "must have the same shape"
        )
    cosine = torch.nn.functional.cosine_similarity(pred_velocity.float(), target_velocity.float(), dim=1)
    return (1 - cosine).flatten(1).mean(dim=1)  # cosine: (B, H, W)


class TrainingInputs(NamedTuple):
    t: Tensor  # (B,) float32 times
    noise: Tensor  # (B, ...) like data
    x_t: Tensor  # (B, ...) model input
    target_velocity: Tensor  # (B, ...) regression target


def sample_training_inputs(
    data: Tensor,
    path: PathType | str,
    time_sampler: TimeSampler | str,
    generator: torch.Generator | None = None,
) -> TrainingInputs:
    """Draw t (first) and noise (second) from `generator`, and return the model input and target.

    data: (B, ...) clean latents. `time_sampler` is a sampler or a name for `create_time_sampler`.
    """
    if isinstance(time_sampler, str):
        time_sampler = create_time_sampler(time_sampler)
    t = time_sampler(data.shape[0], path, generator=generator, device=data.device)
    noise = torch.randn(data.shape, generator=generator, device=data.device, dtype=data.dtype)
    x_t, target_velocity = interpolate(path, data, noise, t)
    return TrainingInputs(t=t, noise=noise, x_t=x_t, target_velocity=target_velocity)
