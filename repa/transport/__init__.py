"""Flow-matching maths in REPA's time convention (t=0 data, t=1 noise): pure functions on tensors.

paths      the interpolants (linear, cosine), their derivatives, score and diffusion for the SDE
objective  training-time samplers and the denoising loss
samplers   Euler / Heun ODE, Euler-Maruyama SDE, classifier-free guidance with an interval
"""

from repa.transport.objective import (
    TIME_SAMPLER_ALIASES,
    TIME_SAMPLERS,
    LogitNormalTime,
    TimeSampler,
    TrainingInputs,
    UniformTime,
    create_time_sampler,
    denoising_loss,
    sample_training_inputs,
)
from repa.transport.paths import (
    PathCoefficients,
    PathType,
    diffusion_coefficient,
    expand_time,
    interpolate,
    parse_path,
    path_coefficients,
    score_from_velocity,
)
from repa.transport.samplers import (
    METHODS_BY_MODE,
    SDE_LAST_TIME,
    Guidance,
    PerSampleNoise,
    SampleMethod,
    SampleMode,
    VelocityFn,
    euler_maruyama_step,
    euler_step,
    guided_velocity,
    heun_step,
    sample,
    time_grid,
)

__all__ = [
    "METHODS_BY_MODE",
    "SDE_LAST_TIME",
    "TIME_SAMPLERS",
    "TIME_SAMPLER_ALIASES",
    "Guidance",
    "LogitNormalTime",
    "PathCoefficients",
    "PathType",
    "PerSampleNoise",
    "SampleMethod",
    "SampleMode",
    "TimeSampler",
    "TrainingInputs",
    "UniformTime",
    "VelocityFn",
    "create_time_sampler",
    "denoising_loss",
    "diffusion_coefficient",
    "euler_maruyama_step",
    "euler_step",
    "expand_time",
    "guided_velocity",
    "heun_step",
    "interpolate",
    "parse_path",
    "path_coefficients",
    "sample",
    "sample_training_inputs",
    "score_from_velocity",
    "time_grid",
]
