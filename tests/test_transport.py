"""Paths, time samplers and the denoising loss (repa.transport.paths / objective)."""

from __future__ import annotations

import math

import pytest
import torch

from repa.transport import (
    LogitNormalTime,
    PathType,
    UniformTime,
    create_time_sampler,
    denoising_loss,
    diffusion_coefficient,
    interpolate,
    parse_path,
    path_coefficients,
    sample_training_inputs,
    score_from_velocity,
    time_grid,
)

PATHS = ["linear", "cosine"]


def _data_and_noise(batch: int = 5, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(batch, 3, 4, 4, generator=generator, dtype=dtype)
    noise = torch.randn(batch, 3, 4, 4, generator=generator, dtype=dtype)
    return data, noise


# ----------------------------------------------------------------------------------------------
# paths


@pytest.mark.parametrize("path", PATHS)
def test_interpolate_endpoints(path):
    data, noise = _data_and_noise()
    x0, _ = interpolate(path, data, noise, torch.zeros(5, dtype=torch.float64))
    x1, _ = interpolate(path, data, noise, torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(x0, data, rtol=0, atol=1e-12)
    torch.testing.assert_close(x1, noise, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_target_velocity_is_time_derivative(path):
    data, noise = _data_and_noise()
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    step = 1e-6
    # one-sided differences at the endpoints, central inside
    t_plus, t_minus = (t + step).clamp(max=1.0), (t - step).clamp(min=0.0)
    x_plus, _ = interpolate(path, data, noise, t_plus)
    x_minus, _ = interpolate(path, data, noise, t_minus)
    finite_difference = (x_plus - x_minus) / (t_plus - t_minus).view(-1, 1, 1, 1)
    _, target_velocity = interpolate(path, data, noise, t)
    torch.testing.assert_close(target_velocity, finite_difference, rtol=0, atol=1e-5)


def test_linear_path_matches_spec_formulas():
    data, noise = _data_and_noise()
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    x_t, velocity = interpolate("linear", data, noise, t)
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - tb) * data + tb * noise)
    torch.testing.assert_close(velocity, noise - data)


def test_interpolate_keeps_data_dtype_and_checks_shapes():
    data, noise = _data_and_noise(dtype=torch.float32)
    x_t, velocity = interpolate("cosine", data.bfloat16(), noise.bfloat16(), torch.rand(5))
    assert x_t.dtype == velocity.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        interpolate("linear", data, noise, torch.rand(4))
    with pytest.raises(ValueError, match="same shape"):
        interpolate("linear", data, noise[:, :2], torch.rand(5))


def _gaussian_velocity_and_score(path, x_t, t, mean, std):
    """Exact E[v | x_t] and grad log p_t for data ~ N(mean, std^2) (elementwise)."""
    alpha, sigma, d_alpha, d_sigma = (
        torch.as_tensor(c, dtype=torch.float64) for c in path_coefficients(path, t)
    )
    variance = alpha**2 * std**2 + sigma**2
    centred = x_t - alpha * mean
    velocity = d_alpha * mean + (d_alpha * alpha * std**2 + d_sigma * sigma) / variance * centred
    return velocity, -centred / variance


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("t", [1.0, 0.7, 0.3, 0.04])
def test_score_from_velocity_is_exact_for_a_gaussian(path, t):
    mean, std = 0.7, 0.4
    x_t = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    velocity, score = _gaussian_velocity_and_score(path, x_t, t, mean, std)
    torch.testing.assert_close(score_from_velocity(path, velocity, x_t, t), score)
    # (B,) times give the same answer as a shared scalar time
    t_batch = torch.full((64,), t, dtype=torch.float64)
    torch.testing.assert_close(score_from_velocity(path, velocity, x_t, t_batch), score)


def test_linear_score_reduces_to_spec_formula():
    x_t, velocity = _data_and_noise()
    for t in [1.0, 0.5, 0.04]:
        expected = -(x_t + (1 - t) * velocity) / t
        torch.testing.assert_close(score_from_velocity("linear", velocity, x_t, t), expected)


@pytest.mark.parametrize("path", PATHS)
def test_score_is_finite_wherever_the_sde_evaluates_it(path):
    x_t, velocity = _data_and_noise(dtype=torch.float32)
    for t in time_grid("sde", 250)[:-1]:  # the last time, 0, is reached by the mean step only
        assert torch.isfinite(score_from_velocity(path, velocity, x_t, t)).all(), t


def test_diffusion_coefficient_is_two_t():
    t = torch.rand(7)
    for path in PATHS:
        torch.testing.assert_close(diffusion_coefficient(path, t), 2 * t)
        assert diffusion_coefficient(path, 0.04) == pytest.approx(0.08)


def test_cosine_coefficients_at_the_endpoints():
    alpha, sigma, d_alpha, d_sigma = path_coefficients(PathType.COSINE, 0.0)
    assert (float(alpha), float(sigma), float(d_alpha), float(d_sigma)) == pytest.approx(
        (1, 0, 0, math.pi / 2)
    )
    alpha, sigma, d_alpha, d_sigma = path_coefficients(PathType.COSINE, 1.0)
    assert (float(alpha), float(sigma), float(d_alpha), float(d_sigma)) == pytest.approx(
        (0, 1, -math.pi / 2, 0), abs=1e-12
    )


def test_unknown_path_names_the_choices():
    assert parse_path("Linear") is PathType.LINEAR
    with pytest.raises(ValueError, match="'linear', 'cosine'"):
        parse_path("vp")
    with pytest.raises(ValueError, match="'linear', 'cosine'"):
        interpolate("edm", *_data_and_noise(), torch.rand(5))


# ----------------------------------------------------------------------------------------------
# time samplers


def _normal_quantiles(probabilities: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2) * torch.erfinv(2 * probabilities - 1)


def test_uniform_time_range_and_seeding():
    sampler = create_time_sampler("uniform")
    assert isinstance(sampler, UniformTime)
    t = sampler(10_000, "linear", generator=torch.Generator().manual_seed(3), device="cpu")
    assert t.shape == (10_000,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02
    again = sampler(10_000, "linear", generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, again)


@pytest.mark.parametrize("location, scale", [(0.0, 1.0), (0.5, 0.6)])
def test_logit_normal_quantiles_on_the_linear_path(location, scale):
    sampler = create_time_sampler("logit-normal", location=location, scale=scale)
    t = sampler(40_000, "linear", generator=torch.Generator().manual_seed(4))
    assert t.min() > 0 and t.max() < 1
    probabilities = torch.linspace(0.05, 0.95, 19)
    expected = torch.sigmoid(location + scale * _normal_quantiles(probabilities))  # sigmoid(N(loc, s^2))
    torch.testing.assert_close(torch.quantile(t, probabilities), expected, rtol=0, atol=0.01)


def test_repa_lognormal_is_logit_normal_0_1():
    repa = create_time_sampler("lognormal")
    assert repa == LogitNormalTime(0.0, 1.0)
    a = repa(100, "linear", generator=torch.Generator().manual_seed(5))
    # REPA's recipe written out: sigma = exp(N(0,1)), t = sigma / (1 + sigma)
    sigma = torch.exp(torch.randn(100, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(a, sigma / (1 + sigma))


def test_logit_normal_on_the_cosine_path():
    t = create_time_sampler("lognormal")(40_000, "cosine", generator=torch.Generator().manual_seed(6))
    assert t.min() > 0 and t.max() < 1
    probabilities = torch.linspace(0.05, 0.95, 19)
    expected = (2 / math.pi) * torch.atan(torch.exp(_normal_quantiles(probabilities)))
    torch.testing.assert_close(torch.quantile(t, probabilities), expected, rtol=0, atol=0.01)


def test_time_sampler_errors_name_the_choices():
    with pytest.raises(ValueError, match="'uniform', 'logit-normal', 'lognormal'"):
        create_time_sampler("beta")
    with pytest.raises(ValueError, match="scale must be > 0"):
        create_time_sampler("logit-normal", scale=0.0)
    with pytest.raises(ValueError, match="bad arguments"):
        create_time_sampler("uniform", scale=2.0)


# ----------------------------------------------------------------------------------------------
# loss and training inputs


def test_denoising_loss_analytic_value():
    target = torch.zeros(2, 1, 2, 2)
    prediction = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    loss = denoising_loss(prediction, target)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor([(1 + 4 + 9 + 16) / 4, 0.25]))
    # a prediction off by a per-sample constant c costs c^2; bf16 inputs are reduced in float32
    target = torch.randn(3, 4, 8, 8)
    offsets = torch.tensor([0.0, 0.5, -2.0])
    loss = denoising_loss((target + offsets.view(-1, 1, 1, 1)).bfloat16(), target.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, offsets**2, rtol=0.02, atol=0.02)


def test_denoising_loss_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        denoising_loss(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 4))


@pytest.mark.parametrize("path", PATHS)
def test_sample_training_inputs_is_one_consistent_call(path):
    data = torch.randn(6, 4, 8, 8)
    inputs = sample_training_inputs(data, path, "lognormal", generator=torch.Generator().manual_seed(7))
    assert inputs.t.shape == (6,) and inputs.noise.shape == data.shape
    assert ((inputs.t > 0) & (inputs.t < 1)).all()
    x_t, target_velocity = interpolate(path, data, inputs.noise, inputs.t)
    torch.testing.assert_close(inputs.x_t, x_t)
    torch.testing.assert_close(inputs.target_velocity, target_velocity)
    again = sample_training_inputs(
        data, path, create_time_sampler("lognormal"), torch.Generator().manual_seed(7)
    )
    assert all(torch.equal(a, b) for a, b in zip(inputs, again))
    # the exact velocity of the path scores zero loss
    assert denoising_loss(target_velocity, inputs.target_velocity).max() == 0
