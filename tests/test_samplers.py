"""Samplers against closed forms, classifier-free guidance, per-sample determinism, bad inputs."""

from __future__ import annotations

import pytest
import torch

from repa.transport import (
    SDE_LAST_TIME,
    Guidance,
    PerSampleNoise,
    euler_maruyama_step,
    path_coefficients,
    sample,
    time_grid,
)

PATHS = ["linear", "cosine"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run thousands of tiny ops; on a small shared CPU a contended thread pool made
    them ~10x slower (48-67 s vs 5-7 s for this file and test_transport.py), so use one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# Exact velocity fields


def _shared_time(t: torch.Tensor) -> float:
    """The samplers give every row the same time; the exact fields below rely on it."""
    assert (t == t[0]).all()
    return t[0].item()


def mixture_velocity(path, weights, means, stds):
    """E[v | x_t] when data ~ sum_k w_k N(means[k], diag(stds[k]^2)) in D dimensions.

    Given component k, x_t = alpha x + sigma e is Gaussian with mean alpha mu_k and variance
    var_k = alpha^2 s_k^2 + sigma^2 per dimension, and (x, e) are jointly Gaussian with x_t, so
      E[v | x_t, k] = alpha' mu_k + (alpha' alpha s_k^2 + sigma' sigma) / var_k * (x_t - alpha mu_k).
    The mixture's field weights these by the posterior p(k | x_t). Labels are ignored.
    weights (K,), means and stds (K, D); x (B, D).
    """
    log_weights = weights.double().log()
    means, stds = means.double(), stds.double()

    def velocity_fn(x, t, labels):
        alpha, sigma, d_alpha, d_sigma = (float(c) for c in path_coefficients(path, _shared_time(t)))
        variance = alpha**2 * stds**2 + sigma**2  # (K, D)
        gain = (d_alpha * alpha * stds**2 + d_sigma * sigma) / variance  # (K, D)
        centred = x.double()[:, None, :] - alpha * means  # (B, K, D)
        velocity_k = d_alpha * means + gain * centred
        log_joint = (
            log_weights - 0.5 * (centred**2 / variance).sum(-1) - 0.5 * variance.log().sum(-1)
        )  # (B, K)
        posterior = torch.softmax(log_joint, dim=1)[..., None]
        return (posterior * velocity_k).sum(1).to(x.dtype)  # (B, D)

    return velocity_fn


def gaussian_velocity(path, mean, std):
    return mixture_velocity(path, torch.ones(1), torch.as_tensor(mean)[None], torch.as_tensor(std)[None])


class CallRecorder:
    """Wraps a velocity function and records the number of rows of each call."""

    def __init__(self, velocity_fn):
        self.velocity_fn, self.rows = velocity_fn, []

    def __call__(self, x, t, labels):
        assert x.shape[0] == t.shape[0] == labels.shape[0] and t.ndim == 1 and labels.dtype == torch.int64
        self.rows.append(x.shape[0])
        return self.velocity_fn(x, t, labels)


NUM_CLASSES = 3  # the null label is 3
CLASS_MEANS = torch.tensor([[-2.0, 0.0, 1.0, 3.0], [1.0, 1.0, -1.0, 0.0], [0.5, -3.0, 0.0, 2.0], [0.0] * 4])


def class_conditional_velocity(path="linear"):
    """Exact field for x | y ~ N(CLASS_MEANS[y] per channel, I) on (B, 4, H, W); row 3 = null class."""

    def velocity_fn(x, t, labels):
        alpha, sigma, d_alpha, d_sigma = (float(c) for c in path_coefficients(path, _shared_time(t)))
        mean = CLASS_MEANS[labels][:, :, None, None]  # (B, 4, 1, 1)
        gain = (d_alpha * alpha + d_sigma * sigma) / (alpha**2 + sigma**2)
        return (d_alpha * mean + gain * (x.float() - alpha * mean)).to(x.dtype)

    return velocity_fn


def sde_with_batched_noise(velocity_fn, noise, num_steps, path, seed):
    """The SDE sampler's steps with one generator for the whole batch (fast for 10^4 tiny samples)."""
    generator = torch.Generator().manual_seed(seed)
    grid = time_grid("sde", num_steps)
    labels = torch.zeros(noise.shape[0], dtype=torch.long)
    x = noise.clone()
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        increment = None if i == len(grid) - 2 else torch.randn(x.shape, generator=generator)
        x = euler_maruyama_step(velocity_fn, x, t_cur, t_next, labels, Guidance(), path, increment)
    return x


def standardised_noise(num_samples, dim, seed=0):
    """Noise whose sample mean is exactly 0 and sample variance exactly 1 per dimension."""
    noise = torch.randn(num_samples, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ((noise - noise.mean(0)) / noise.std(0, unbiased=False)).float()


def moment_error(samples, mean, variance):
    """max over dimensions of |mean error| / std + |variance ratio - 1|."""
    samples = samples.double()
    mean_error = (samples.mean(0) - mean).abs() / variance.sqrt()
    variance_error = (samples.var(0, unbiased=False) / variance - 1).abs()
    return (mean_error + variance_error).max().item()


# Sample counts kept so that every tensor has fewer than 32768 elements: torch runs such ops on one
# thread, which on a small shared CPU is several times faster than waking a contended thread pool.
GAUSS_SAMPLES, MIX_SAMPLES = 16_000, 8_000
GAUSS_MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
GAUSS_STD = torch.tensor([0.5, 1.5], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Closed-form correctness


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method, tolerance_100, min_gain", [("euler", 0.05, 5.0), ("heun", 0.002, 20.0)])
def test_ode_reproduces_a_gaussian_and_converges(path, method, tolerance_100, min_gain):
    # The exact probability-flow map of a diagonal Gaussian is x_0 = mean + std * noise, and the
    # discrete maps are affine too: with standardised noise there is no Monte Carlo error at all.
    velocity_fn = gaussian_velocity(path, GAUSS_MEAN, GAUSS_STD)
    noise = standardised_noise(4000, 2)
    labels = torch.zeros(4000, dtype=torch.long)
    exact = GAUSS_MEAN + GAUSS_STD * noise.double()
    errors, pointwise = {}, {}
    for num_steps in (10, 100):
        samples = sample(
            velocity_fn, noise, labels, mode="ode", method=method, num_steps=num_steps, path=path
        )
        assert samples.dtype == torch.float32
        errors[num_steps] = moment_error(samples, GAUSS_MEAN, GAUSS_STD**2)
        pointwise[num_steps] = (samples.double() - exact).abs().max().item()
    assert errors[100] < tolerance_100, errors
    assert errors[100] * min_gain < errors[10], errors
    assert pointwise[100] * min_gain < pointwise[10], pointwise


def sde_moments(velocity_fn, path, grid, mean, variance):
    """Exact mean and variance after the library's Euler-Maruyama steps on `grid`, without sampling.

    For a Gaussian the drift is affine in x, so each step is x' = gain x + shift + noise_scale xi;
    one call on the 3 rows (mean, mean + 1, mean) with increments (0, 0, 1) reads off all three.
    """
    labels = torch.zeros(3, dtype=torch.long)
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        x = torch.stack([mean, mean + 1, mean])
        increment = torch.zeros_like(x)
        increment[2] = 1
        last = i == len(grid) - 2
        out = euler_maruyama_step(
            velocity_fn, x, t_cur, t_next, labels, Guidance(), path, None if last else increment
        )
        gain, noise_scale = out[1] - out[0], out[2] - out[0]
        mean, variance = out[0], gain**2 * variance + noise_scale**2
    return mean, variance


def moments_error(moments, reference):
    (mean, variance), (reference_mean, reference_variance) = moments, reference
    mean_error = (mean - reference_mean).abs() / reference_variance.sqrt()
    return (mean_error + (variance / reference_variance - 1).abs()).max().item()


@pytest.mark.parametrize("path", PATHS)
def test_sde_reproduces_a_gaussian_and_converges(path):
    velocity_fn = gaussian_velocity(path, GAUSS_MEAN, GAUSS_STD)
    data_moments = (GAUSS_MEAN, GAUSS_STD**2)
    # The limit of many steps: the exact marginal at t=0.04, then REPA's mean-only step to 0.
    # That step leaves a small bias (~0.02-0.03 here), the price of stopping at 0.04.
    alpha, sigma, _, _ = (float(c) for c in path_coefficients(path, SDE_LAST_TIME))
    marginal = (alpha * GAUSS_MEAN, alpha**2 * GAUSS_STD**2 + sigma**2)
    limit = sde_moments(velocity_fn, path, [SDE_LAST_TIME, 0.0], *marginal)
    assert moments_error(limit, data_moments) < 0.035
    # The discrete scheme's exact moments converge to that limit at first order (no Monte Carlo).
    start = (torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    errors = {
        n: moments_error(sde_moments(velocity_fn, path, time_grid("sde", n), *start), limit)
        for n in (10, 100, 1000)
    }
    assert errors[100] * 5 < errors[10] and errors[1000] * 5 < errors[100], errors
    assert errors[1000] < 0.003, errors  # a score 1% off in its velocity term stays above 0.004
    # Sampling with noise reproduces those moments within Monte Carlo error (4 sigma).
    samples = sde_with_batched_noise(
        velocity_fn,
        torch.randn(GAUSS_SAMPLES, 2, generator=torch.Generator().manual_seed(0)),
        100,
        path,
        seed=1,
    )
    mean_100, variance_100 = sde_moments(velocity_fn, path, time_grid("sde", 100), *start)
    samples = samples.double()
    assert ((samples.mean(0) - mean_100).abs() / variance_100.sqrt()).max() < 4 / GAUSS_SAMPLES**0.5
    assert (samples.var(0) / variance_100 - 1).abs().max() < 4 * (2 / GAUSS_SAMPLES) ** 0.5
    assert moments_error((samples.mean(0), samples.var(0)), data_moments) < 0.06


MIX_WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
MIX_MEANS = torch.tensor([[-2.0, 0.0], [1.5, 1.0]], dtype=torch.float64)
MIX_STDS = torch.tensor([[0.3, 0.5], [0.6, 0.4]], dtype=torch.float64)
MIX_MEAN = (MIX_WEIGHTS[:, None] * MIX_MEANS).sum(0)
MIX_VARIANCE = (MIX_WEIGHTS[:, None] * (MIX_STDS**2 + MIX_MEANS**2)).sum(0) - MIX_MEAN**2


def _check_mixture(samples, tolerance):
    # component 0 sits at x=-2 (std 0.3), component 1 at x=1.5 (std 0.6): split at -0.25
    fraction_in_first = (samples[:, 0] < -0.25).double().mean().item()
    assert abs(fraction_in_first - MIX_WEIGHTS[0].item()) < 0.02, fraction_in_first
    assert moment_error(samples, MIX_MEAN, MIX_VARIANCE) < tolerance


@pytest.mark.parametrize("path", PATHS)
def test_samplers_reproduce_a_gaussian_mixture(path):
    velocity_fn = mixture_velocity(path, MIX_WEIGHTS, MIX_MEANS, MIX_STDS)
    noise = torch.randn(MIX_SAMPLES, 2, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(MIX_SAMPLES, dtype=torch.long)
    # ODE: the flow map is deterministic, so measure the discretisation error against a fine-grid
    # solution on the same noise, and the distribution error on that solution.
    reference = sample(velocity_fn, noise, labels, method="heun", num_steps=100, path=path)
    _check_mixture(reference, tolerance=0.06)
    gaps = {}
    for method, steps in [("euler", 10), ("euler", 100), ("heun", 10), ("heun", 30)]:
        samples = sample(velocity_fn, noise, labels, method=method, num_steps=steps, path=path)
        gaps[method, steps] = (samples - reference).abs().mean().item()
    assert gaps["euler", 100] * 5 < gaps["euler", 10] and gaps["euler", 100] < 0.05, gaps
    assert gaps["heun", 30] * 5 < gaps["heun", 10] and gaps["heun", 30] < 0.005, gaps
    # SDE
    errors = {}
    for num_steps in (10, 100):
        samples = sde_with_batched_noise(velocity_fn, noise, num_steps, path, seed=3)
        errors[num_steps] = moment_error(samples, MIX_MEAN, MIX_VARIANCE)
    _check_mixture(samples, tolerance=0.06)
    assert errors[100] * 2 < errors[10], errors


def test_sample_sde_equals_its_step_functions_with_per_sample_noise():
    # The convergence tests drive the SDE steps with batched noise; this ties them to `sample`.
    velocity_fn = gaussian_velocity("cosine", GAUSS_MEAN, GAUSS_STD)
    seeds, labels = [5, 6, 7], torch.zeros(3, dtype=torch.long)
    samples = sample(velocity_fn, (2,), labels, seeds, mode="sde", num_steps=6, path="cosine")
    noise = PerSampleNoise(seeds)
    x = noise.randn((2,))
    grid = time_grid("sde", 6)
    assert grid[0] == 1.0 and grid[-2] == pytest.approx(0.04) and grid[-1] == 0.0 and len(grid) == 7
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        increment = None if i == 5 else noise.randn((2,))
        x = euler_maruyama_step(velocity_fn, x, t_cur, t_next, labels, Guidance(), "cosine", increment)
    assert torch.equal(samples, x)


def reference_euler(velocity_fn, noise, labels, num_steps, scale=1.0, low=0.0, high=1.0, null=NUM_CLASSES):
    """Plain two-call Euler CFG, written independently of the library (float64 time grid)."""
    x = noise.clone()
    grid = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        t = torch.full((len(x),), t_cur.item())
        velocity = velocity_fn(x, t, labels)
        if low <= t_cur.item() <= high:
            velocity_uncond = velocity_fn(x, t, torch.full_like(labels, null))
            velocity = velocity_uncond + scale * (velocity - velocity_uncond)
        x = x + (t_next - t_cur).item() * velocity
    return x


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance


def _cfg_inputs(batch=5):
    generator = torch.Generator().manual_seed(9)
    noise = torch.randn(batch, 4, 2, 2, generator=generator)
    labels = torch.arange(batch) % NUM_CLASSES
    return noise, labels


def test_cfg_scale_one_is_the_conditional_sampler():
    noise, labels = _cfg_inputs()
    recorder = CallRecorder(class_conditional_velocity())
    samples = sample(recorder, noise, labels, num_steps=8, cfg_scale=1.0, null_label=NUM_CLASSES)
    torch.testing.assert_close(samples, reference_euler(class_conditional_velocity(), noise, labels, 8))
    assert recorder.rows == [5] * 8  # no unconditional rows at all
    # and guided Euler matches the two-call reference
    guided = sample(
        recorder, noise, labels, num_steps=8, cfg_scale=2.5, guidance_high=0.6, null_label=NUM_CLASSES
    )
    expected = reference_euler(class_conditional_velocity(), noise, labels, 8, scale=2.5, high=0.6)
    torch.testing.assert_close(guided, expected)


@pytest.mark.parametrize(
    "mode, method, calls_per_run",
    [("ode", "euler", 6), ("ode", "heun", 11), ("sde", "euler", 6)],
)
@pytest.mark.parametrize("interval", [(0.9, 0.1), (0.55, 0.6)])  # low > high; between grid times
def test_empty_guidance_interval_is_unguided_with_half_the_compute(mode, method, calls_per_run, interval):
    noise, labels = _cfg_inputs()
    low, high = interval
    assert not any(low <= t <= high for t in time_grid(mode, 6))
    kwargs = dict(mode=mode, method=method, num_steps=6, null_label=NUM_CLASSES, path="linear")
    unguided_recorder = CallRecorder(class_conditional_velocity())
    unguided = sample(unguided_recorder, noise, labels, [1, 2, 3, 4, 5], **kwargs)
    recorder = CallRecorder(class_conditional_velocity())
    samples = sample(
        recorder,
        noise,
        labels,
        [1, 2, 3, 4, 5],
        cfg_scale=4.0,
        guidance_low=low,
        guidance_high=high,
        **kwargs,
    )
    assert torch.equal(samples, unguided)
    assert recorder.rows == unguided_recorder.rows == [5] * calls_per_run
    # with the whole interval: the same number of calls, each one batch of 2B rows
    full_recorder = CallRecorder(class_conditional_velocity())
    guided = sample(full_recorder, noise, labels, [1, 2, 3, 4, 5], cfg_scale=4.0, **kwargs)
    assert full_recorder.rows == [10] * calls_per_run
    assert not torch.allclose(guided, unguided)


def test_partial_interval_guides_exactly_the_grid_times_inside_it():
    noise, labels = _cfg_inputs()
    recorder = CallRecorder(class_conditional_velocity())
    sample(
        recorder,
        noise,
        labels,
        num_steps=10,
        cfg_scale=1.8,
        guidance_low=0.0,
        guidance_high=0.7,
        null_label=3,
    )
    # Euler evaluates at 1.0, 0.9, ..., 0.1; guided where t <= 0.7
    assert recorder.rows == [5] * 3 + [10] * 7


# constant per-class velocities (different on each of 4 channels; class 3 is the null class):
# Euler integrates them exactly
CLASS_VELOCITY = torch.tensor(
    [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [-1.0, 0.5, 2.0, 0.0]]
)


def _constant_velocity(x, t, labels):
    return CLASS_VELOCITY[labels][:, :, None, None].expand_as(x)


def test_guidance_formula_on_all_channels():
    constant, velocity_fn = CLASS_VELOCITY, _constant_velocity
    noise, labels = _cfg_inputs(batch=3)
    scale = 3.0
    guided = constant[3] + scale * (constant[:3] - constant[3])  # (3, 4): every channel guided
    samples = sample(
        velocity_fn, noise, labels, num_steps=4, cfg_scale=scale, guidance_high=0.5, null_label=3
    )
    # grid 1, .75, .5, .25: conditional for the first two steps, guided for the last two
    expected = noise - (0.5 * constant[:3] + 0.5 * guided)[:, :, None, None]
    torch.testing.assert_close(samples, expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_cfg_channels_guides_only_the_first_channels(channels):
    """--cfg-channels N (DiT/SiT/LightningDiT/PixArt: 3): channels < N get the guided velocity,
    channels >= N the conditional one; unset, every channel is guided (the default)."""
    constant, velocity_fn = CLASS_VELOCITY, _constant_velocity
    noise, labels = _cfg_inputs(batch=3)
    scale = 3.0
    guided = constant[3] + scale * (constant[:3] - constant[3])
    partly = torch.cat([guided[:, :channels], constant[:3, channels:]], dim=1)  # (3, 4)
    kwargs = dict(num_steps=4, cfg_scale=scale, guidance_high=0.5, null_label=3)
    samples = sample(velocity_fn, noise, labels, cfg_channels=channels, **kwargs)
    expected = noise - (0.5 * constant[:3] + 0.5 * partly)[:, :, None, None]
    torch.testing.assert_close(samples, expected)
    assert not torch.allclose(samples, sample(velocity_fn, noise, labels, **kwargs))
    # N = all channels is the default full-channel guidance
    torch.testing.assert_close(
        sample(velocity_fn, noise, labels, cfg_channels=4, **kwargs),
        sample(velocity_fn, noise, labels, **kwargs),
    )


def test_cfg_channels_bad_values():
    noise, labels = _cfg_inputs(batch=2)
    velocity_fn = class_conditional_velocity()
    with pytest.raises(ValueError, match="cfg_channels 5 exceeds the 4 channels"):
        sample(velocity_fn, noise, labels, num_steps=2, cfg_scale=2.0, null_label=3, cfg_channels=5)
    with pytest.raises(ValueError, match="cfg_channels must be an integer >= 1"):
        sample(velocity_fn, noise, labels, num_steps=2, cfg_scale=2.0, null_label=3, cfg_channels=0)


def test_cfg_channels_in_sampler_settings_and_flags():
    import argparse

    from repa.commands.sample import add_sampler_arguments, sampler_settings_from_args
    from repa.eval.sample import SamplerSettings

    parser = argparse.ArgumentParser()
    add_sampler_arguments(parser)
    assert sampler_settings_from_args(parser.parse_args([])).cfg_channels is None
    settings = sampler_settings_from_args(parser.parse_args(["--cfg-channels", "3"]))
    assert settings.cfg_channels == 3 and settings.to_dict()["cfg_channels"] == 3
    # records made before the option existed (no key) still match full-channel guidance
    assert "cfg_channels" not in SamplerSettings().to_dict()
    with pytest.raises(ValueError, match="cfg_channels must be >= 1"):
        SamplerSettings(cfg_channels=0)


# ----------------------------------------------------------------------------------------------
# Per-sample determinism


@pytest.mark.parametrize("mode, method", [("sde", "euler"), ("ode", "heun")])
def test_a_sample_depends_only_on_its_seed(mode, method):
    seeds = [101, 7, 55, 3, 999, 42, 8, 1234]
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    kwargs = dict(
        mode=mode, method=method, num_steps=5, cfg_scale=2.0, guidance_high=0.6, null_label=3, path="cosine"
    )
    velocity_fn = class_conditional_velocity("cosine")
    full = sample(velocity_fn, (4, 2, 2), labels, seeds, **kwargs)
    assert full.shape == (8, 4, 2, 2) and full.dtype == torch.float32
    for i in range(8):  # batch size 1
        assert torch.equal(
            sample(velocity_fn, (4, 2, 2), labels[i : i + 1], seeds[i : i + 1], **kwargs), full[i : i + 1]
        )
    for rows in ([0, 1, 2], [5, 3, 7]):  # batch size 3
        subset = sample(velocity_fn, (4, 2, 2), labels[rows], [seeds[r] for r in rows], **kwargs)
        assert torch.equal(subset, full[rows])
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    shuffled = sample(velocity_fn, (4, 2, 2), labels[order], torch.tensor(seeds)[order], **kwargs)
    assert torch.equal(shuffled, full[order])
    # different seeds, different samples; same seeds, same samples
    assert not torch.allclose(full[0], full[1])
    assert torch.equal(sample(velocity_fn, (4, 2, 2), labels, seeds, **kwargs), full)


def test_per_sample_noise_rows_are_independent_of_the_batch():
    batch = PerSampleNoise([3, 4, 5]).randn((2, 3))
    alone = PerSampleNoise([4]).randn((2, 3))
    assert torch.equal(batch[1:2], alone)
    assert torch.equal(alone[0], torch.randn(2, 3, generator=torch.Generator().manual_seed(4)))


def test_state_stays_float32_when_the_model_runs_in_bf16():
    seen = []

    def bf16_model(x, t, labels):
        seen.append((x.dtype, t.dtype))
        return class_conditional_velocity()(x, t, labels).bfloat16()

    noise, labels = _cfg_inputs()
    samples = sample(bf16_model, noise, labels, num_steps=3, model_dtype=torch.bfloat16)
    assert samples.dtype == torch.float32
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}


# ----------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_steps=0), "num_steps must be an integer >= 1"),
        (dict(num_steps=2.5), "num_steps must be an integer >= 1"),
        (dict(mode="probability-flow"), "valid choices: 'ode', 'sde'"),
        (dict(method="rk4"), "valid choices: 'euler', 'heun'"),
        (dict(mode="sde", method="heun"), "not available for mode 'sde'; valid: 'euler'"),
        (dict(path="vp"), "valid choices: 'linear', 'cosine'"),
        (dict(guidance_low=-0.1), r"guidance_low must lie in \[0, 1\]"),
        (dict(guidance_high=1.5), r"guidance_high must lie in \[0, 1\]"),
        (dict(cfg_scale=2.0, null_label=None), "needs null_label"),
    ],
)
def test_bad_inputs_name_the_valid_choices(overrides, message):
    noise, labels = _cfg_inputs(batch=2)
    kwargs = dict(num_steps=2, null_label=3, cfg_scale=1.5)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        sample(class_conditional_velocity(), noise, labels, [1, 2], **kwargs)


def test_bad_seeds_and_shapes():
    noise, labels = _cfg_inputs(batch=2)
    velocity_fn = class_conditional_velocity()
    with pytest.raises(ValueError, match="one per sample"):
        sample(velocity_fn, noise, labels, [1, 2, 3], num_steps=2)
    with pytest.raises(ValueError, match="needs seeds"):
        sample(velocity_fn, noise, labels, mode="sde", num_steps=2)
    with pytest.raises(ValueError, match="pass seeds"):
        sample(velocity_fn, (4, 2, 2), labels, num_steps=2)
    with pytest.raises(ValueError, match="noise has batch 2 but labels have 3"):
        sample(velocity_fn, noise, torch.zeros(3, dtype=torch.long), num_steps=2)
