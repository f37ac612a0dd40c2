"""Interpolants between data and noise, in REPA's time convention (t=0 data, t=1 noise).

A path is a pair of schedules (alpha_t, sigma_t) with

    x_t = alpha_t * data + sigma_t * noise,      noise ~ N(0, I),
    v_t = dx_t/dt = alpha'_t * data + sigma'_t * noise   (the velocity the model predicts).

This module is the single home of that maths: the training objective (`interpolate`) and the
samplers (`score_from_velocity`, `diffusion_coefficient`) both read the schedules from here.

Time `t` is either a (B,) tensor, broadcast over the trailing dimensions of the batch, or a 0-dim
tensor / Python float shared by the whole batch (what the samplers pass: one time per step).
SiT, LightningDiT and RAE run time the other way (t=1 data); their t is 1 - ours and their
velocity is minus ours.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor


class PathType(str, Enum):
    """Which interpolant: `linear` (rectified flow) or `cosine` (SiT's "GVP")."""

    LINEAR = "linear"
    COSINE = "cosine"


def parse_path(path: PathType | str) -> PathType:
    """`PathType` from itself or its name ("linear", "cosine"); unknown names list the choices."""
    if isinstance(path, PathType):
        return path
    try:
        return PathType(str(path).lower())
    except ValueError:
        choices = ", ".join(repr(p.value) for p in PathType)
        raise ValueError(f"unknown path {path!r}; valid choices: {choices}") from None


class PathCoefficients(NamedTuple):
    """alpha_t, sigma_t and their time derivatives, each shaped like `t` (or a scalar)."""

    alpha: Tensor | float
    sigma: Tensor | float
    d_alpha: Tensor | float
    d_sigma: Tensor | float


def _linear(t: Tensor) -> PathCoefficients:
    # x_t = (1 - t) x + t e  ->  v = e - x
    return PathCoefficients(alpha=1 - t, sigma=t, d_alpha=-1.0, d_sigma=1.0)


def _cosine(t: Tensor) -> PathCoefficients:
    # x_t = cos(pi t / 2) x + sin(pi t / 2) e
    half_pi = math.pi / 2
    cos, sin = torch.cos(half_pi * t), torch.sin(half_pi * t)
    return PathCoefficients(alpha=cos, sigma=sin, d_alpha=-half_pi * sin, d_sigma=half_pi * cos)


_COEFFICIENTS = {PathType.LINEAR: _linear, PathType.COSINE: _cosine}


def path_coefficients(path: PathType | str, t: Tensor | float) -> PathCoefficients:
    """alpha(t), sigma(t), alpha'(t), sigma'(t) for `path`.

    A Python float is turned into a float64 0-dim tensor, so the samplers compute their per-step
    scalars in double precision; tensors keep their dtype and device.
    """
    if not isinstance(t, Tensor):
        t = torch.tensor(float(t), dtype=torch.float64)
    return _COEFFICIENTS[parse_path(path)](t)


def expand_time(t: Tensor | float, like: Tensor) -> Tensor | float:
    """Reshape a (B,) time (or coefficient) to (B, 1, ..., 1) so it broadcasts over `like`.

    Scalars and 0-dim tensors are returned unchanged (they broadcast already).
    """
    if not isinstance(t, Tensor) or t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"time must have shape (B,) = ({like.shape[0]},) to match a batch of shape "
            f"{tuple(like.shape)}, got {tuple(t.shape)}"
        )
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(path: PathType | str, data: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Point on the path and its velocity: x_t = alpha data + sigma noise, v = alpha' data + sigma' noise.

    data, noise: (B, ...) of the same shape; t: (B,). Returns (x_t, target_velocity), both (B, ...).
    The coefficients are computed in t's dtype and the products take data's dtype.
    """
    if data.shape != noise.shape:
        raise ValueError(f"data {tuple(data.shape)} and noise {tuple(noise.shape)} must have the same shape")
    alpha, sigma, d_alpha, d_sigma = (expand_time(c, data) for c in path_coefficients(path, t))
    x_t = alpha * data + sigma * noise
    target_velocity = d_alpha * data + d_sigma * noise
    return x_t.to(data.dtype), target_velocity.to(data.dtype)


def score_from_velocity(path: PathType | str, velocity: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """Score grad log p_t(x_t) implied by a velocity prediction.

    From x_t = alpha x + sigma e and v = alpha' x + sigma' e, eliminating x gives the noise
    e_hat = (alpha v - alpha' x_t) / (alpha sigma' - alpha' sigma), and the score is -e_hat / sigma:

        s = (alpha' x_t - alpha v) / (sigma (alpha sigma' - alpha' sigma)).

    This equals the spec's s = (r v - x_t) / (sigma^2 - r sigma' sigma) with r = alpha / alpha'
    (multiply numerator and denominator by alpha'), but never divides by alpha', which is 0 at
    t=0 on the cosine path. alpha sigma' - alpha' sigma is 1 (linear) or pi/2 (cosine) for all t,
    so the only singularity is sigma = 0 at t = 0, where the data score does not exist; the
    samplers never evaluate it there (the SDE's last stochastic time is 0.04). For the linear path
    this reduces to s = -(x_t + (1 - t) v) / t.
    """
    alpha, sigma, d_alpha, d_sigma = path_coefficients(path, t)
    denominator = sigma * (alpha * d_sigma - d_alpha * sigma)
    x_coef, v_coef = expand_time(d_alpha / denominator, x_t), expand_time(alpha / denominator, x_t)
    return (x_coef * x_t - v_coef * velocity).to(velocity.dtype)


def diffusion_coefficient(path: PathType | str, t: Tensor | float) -> Tensor | float:
    """w(t), the squared diffusion of the sampling SDE dx = (v - w/2 s) dt + sqrt(w) dW.

    REPA uses w(t) = 2t for both paths (any w >= 0 leaves the marginals unchanged; this one
    vanishes at the data end). Kept here so that every sampler reads the same choice.
    """
    parse_path(path)  # validate the name even though both paths share w
    return 2 * t
