"""Interval maths for comparisons over seeds: t-intervals, bootstrap intervals, the speed-up factor.

    interval = mean_interval([20.1, 21.4, 19.8])         # t-interval (2-4 values), bootstrap (>= 5)
    interval.low, interval.high                          # None for a single value: no interval
    speedup_interval(steps, base_curves, arm_curves)     # factor and its bootstrap interval over seeds
    proportion_interval(19, 512)                         # Wilson interval of a share (one seed)

Nothing here needs scipy: Student's t quantiles come from the exact closed-form CDF for integer
degrees of freedom (inverted by bisection), so the intervals agree with scipy.stats.t to ~1e-10.

The speed-up factor of an arm over a baseline arm is read from their seed-mean curves: the
baseline's best mean value and the first step it was reached at (s_B), and the step at which
the arm's mean curve first reaches that value (s_A, linearly interpolated between evaluated
steps, so the factor moves smoothly with the curves), factor = s_B / s_A. Its interval
resamples seeds with replacement inside each arm, independently, and recomputes the factor
from the resampled mean curves (a percentile bootstrap); resamples in which the arm never
reaches the baseline's best count as factor 0 (slower than anything measurable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

BOOTSTRAP_FROM = 5  # seeds from which the per-step interval is a bootstrap instead of a t-interval
DEFAULT_RESAMPLES = 2000


# ---- Student's t ---------------------------------------------------------------------------------


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer `df` >= 1, from the closed form (Abramowitz & Stegun
    26.7.3/26.7.4): with theta = atan(t / sqrt(df)), P(|T| < t) is a finite series in cos(theta)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos, sin = math.cos(theta), math.sin(theta)
    cos2 = cos * cos
    if df % 2 == 1:
        total, term = 0.0, cos  # sin(theta) * (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ...)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= cos2 * (2 * k) / (2 * k + 1)
        central = 2 / math.pi * (theta + (sin * total if df > 1 else 0.0))
    else:
        total, term = 0.0, 1.0  # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        for k in range(1, df // 2 + 1):
            total += term
            term *= cos2 * (2 * k - 1) / (2 * k)
        central = sin * total
    return 0.5 + math.copysign(central / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with integer `df` (bisection on `t_cdf`, to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


# ---- intervals of a mean -------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A mean over `n` values and its interval (`low`/`high` None when n == 1: no interval)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    method: str  # "t", "bootstrap", "wilson" (a proportion) or "none"
    confidence: float = 0.95

    @property
    def has_interval(self) -> bool:
        return self.low is not None

    def contains(self, value: float) -> bool:
        return self.has_interval and self.low <= value <= self.high

    def to_dict(self) -> dict:
        return asdict(self)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """mean +- t_{(1+c)/2, n-1} * s / sqrt(n), s the sample standard deviation (ddof=1)."""
    data = np.asarray(values, dtype=np.float64)
    n = data.size
    mean = float(data.mean())
    if n < 2:
        return Interval(mean, None, None, n, "none", confidence)
    half = t_quantile(0.5 + confidence / 2, n - 1) * float(data.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "t", confidence)


def bootstrap_interval(
    values: Sequence[float],
    confidence: float = 0.95,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap of the mean: `resamples` draws of n values with replacement (seeded,
    so a report is reproducible); the interval is the (1-c)/2 and (1+c)/2 quantiles."""
    data = np.asarray(values, dtype=np.float64)
    n = data.size
    mean = float(data.mean())
    if n < 2:
        return Interval(mean, None, None, n, "none", confidence)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.quantile(means, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Interval(mean, float(low), float(high), n, "bootstrap", confidence)


def mean_interval(values: Sequence[float], confidence: float = 0.95, *, seed: int = 0) -> Interval:
    """The interval the curves report: none for one value, a t-interval for 2-4 values (a
    bootstrap of so few values is too narrow), a percentile bootstrap from 5 values on."""
    if len(values) >= BOOTSTRAP_FROM:
        return bootstrap_interval(values, confidence, seed=seed)
    return t_interval(values, confidence)


def proportion_interval(successes: int, trials: int, confidence: float = 0.95) -> Interval:
    """Wilson's score interval of a share `successes / trials` (e.g. prompts followed out of those
    sampled): unlike the normal approximation it stays inside [0, 1] and does not collapse to a
    point at 0 or `trials` successes, which matters for shares near chance of a few percent."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}, {trials}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    return Interval(share, max(0.0, centre - half), min(1.0, centre + half), trials, "wilson", confidence)


# ---- the speed-up factor -------------------------------------------------------------------------


def crossing_step(
    steps: Sequence[float], values: Sequence[float], threshold: float, higher_is_better: bool = False
) -> float | None:
    """The first step at which a curve reaches `threshold` (<= it, or >= when higher is better),
    linearly interpolated between the two evaluated steps around the crossing; None if never."""
    sign = -1.0 if higher_is_better else 1.0
    previous = None
    for step, value in zip(steps, values):
        if sign * value <= sign * threshold:
            if previous is None or previous[1] == value:
                return float(step)
            (s0, v0), (s1, v1) = previous, (step, value)
            return float(s0 + (threshold - v0) * (s1 - s0) / (v1 - v0))
        previous = (step, value)
    return None


def speedup_factor(
    steps: Sequence[float],
    base_mean: Sequence[float],
    arm_mean: Sequence[float],
    higher_is_better: bool = False,
) -> tuple[float | None, dict]:
    """Baseline best step / the step the arm first reaches the baseline's best (see the module
    docstring). Returns (factor or None, details); None when not reached or reached at step 0."""
    base = np.asarray(base_mean, dtype=np.float64)
    best_index = int(np.argmax(base) if higher_is_better else np.argmin(base))
    best, best_step = float(base[best_index]), float(steps[best_index])
    reached = crossing_step(steps, arm_mean, best, higher_is_better)
    details = {"baseline_best": best, "baseline_best_step": best_step, "step": reached}
    if reached is None or reached <= 0:
        return None, details
    return best_step / reached, details


def _resampled_means(curves: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n, S) curves -> (R, S) means of n seeds drawn with replacement. The draws' spread around
    the mean is widened by sqrt(n / (n - 1)): a plain resample's variance is (n - 1) / n of the
    sample variance, which with 5 seeds makes a 95% interval cover ~90% of the time."""
    n = curves.shape[0]
    if n == 1:
        return np.repeat(curves, resamples, axis=0)
    mean = curves.mean(axis=0)
    drawn = curves[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    return mean + (drawn - mean) * math.sqrt(n / (n - 1))


@dataclass(frozen=True)
class SpeedupInterval:
    factor: float | None  # from the seed-mean curves; None: not reached (or at step 0)
    low: float | None  # percentile bootstrap over seeds; None with one seed in both arms
    high: float | None
    includes_one: bool | None  # the interval reaches 1 (no speed-up is within the noise)
    reached_fraction: float  # share of bootstrap resamples in which the arm reached the best
    baseline_best: float
    baseline_best_step: float
    step: float | None
    seeds: tuple[int, int]  # (baseline seeds, arm seeds)
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def speedup_interval(
    steps: Sequence[float],
    base_curves: np.ndarray,
    arm_curves: np.ndarray,
    *,
    higher_is_better: bool = False,
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> SpeedupInterval:
    """Speed-up factor and its bootstrap interval. base_curves: (seeds_B, S), arm_curves:
    (seeds_A, S), each row one seed's metric at `steps` (the same S evaluated steps)."""
    base = np.atleast_2d(np.asarray(base_curves, dtype=np.float64))
    arm = np.atleast_2d(np.asarray(arm_curves, dtype=np.float64))
    if base.shape[1] != len(steps) or arm.shape[1] != len(steps):
        raise ValueError(f"curves must have one value per step ({len(steps)}): {base.shape}, {arm.shape}")
    factor, details = speedup_factor(steps, base.mean(0), arm.mean(0), higher_is_better)
    n_base, n_arm = base.shape[0], arm.shape[0]
    low = high = includes_one = None
    reached_fraction = float(factor is not None)
    if n_base > 1 or n_arm > 1:
        rng = np.random.default_rng(seed)
        base_means = _resampled_means(base, resamples, rng)  # (R, S)
        arm_means = _resampled_means(arm, resamples, rng)
        factors = np.array(
            [speedup_factor(steps, b, a, higher_is_better)[0] or 0.0 for b, a in zip(base_means, arm_means)]
        )
        reached_fraction = float((factors > 0).mean())
        low, high = (float(q) for q in np.quantile(factors, [0.5 - confidence / 2, 0.5 + confidence / 2]))
        includes_one = low <= 1.0 <= high
    return SpeedupInterval(
        factor,
        low,
        high,
        includes_one,
        reached_fraction,
        details["baseline_best"],
        details["baseline_best_step"],
        details["step"],
        (n_base, n_arm),
        confidence,
    )
