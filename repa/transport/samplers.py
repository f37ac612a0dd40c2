"""Samplers that integrate a velocity model from noise (t=1) to data (t=0).

  ODE  Euler or Heun on the grid linspace(1, 0, N+1); Heun averages the slope at the current
       and next point, except on the last step (which ends at t=0) where it is plain Euler.
  SDE  Euler-Maruyama on linspace(1, 0.04, N) followed by 0:
           d = v - (w/2) s,   x <- x + d dt + sqrt(w |dt|) xi,   w(t) = 2t, s = score from v;
       the last step, 0.04 -> 0, takes the mean only (no noise).

Classifier-free guidance v = v_u + scale (v_c - v_u), on all channels, is applied only at times
low <= t <= high. Heun's corrector (evaluated at t_next) is guided when the step's own time t_cur
is in the interval, as REPA decides it, so the step that crosses an interval edge matches REPA's.

Time shift (`time_shift` k, LightningDiT's timestep shift in our convention): every grid point t
becomes k t / (1 + (k - 1) t), which keeps 0 and 1 and, for k > 1, spends more steps at high noise
(SD3/FLUX's shift). LightningDiT's `timestep_shift` s acts on its own time u = 1 - t as
s u / (1 + (s - 1) u); written in t that is exactly the map above with k = 1 / s. k = 1: no shift.

With `cfg_channels` N only the first N latent channels are guided and the
others keep the conditional prediction, as DiT, SiT, LightningDiT and PixArt do with N = 3, so
their published CFG scales reproduce (docs/conventions.md, "Sampling and evaluation").
`cfg_scale_map` gives each element of the state its own scale inside the interval (REG's joint
state: the latent's scale on the latent, --cls-cfg-scale on the class token; repa.eval.sample).
Inside the interval the model is called once on the stacked batch [x; x] with labels [y; null];
outside it (or with scale 1) only the conditional half is computed. In the SDE guidance is
applied to the velocity before the drift; since the drift is affine in v with the same x for
both halves, that equals REPA's guidance on the drift.

Every random number a sample uses (its initial noise and each SDE increment) comes from its own
generator seeded by its own seed (`PerSampleNoise`), so a sample does not depend on the batch it
is drawn in. The state is kept in float32 (float64 if the given noise is float64) whatever
precision the model runs in; time grids are float64 and cast to the model's dtype per call.
The model callable is `velocity_fn(x, t, labels) -> velocity` with x (B, ...), t (B,), labels
(B,) int64; it must return the velocity only (no projector outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from repa.transport.paths import PathType, diffusion_coefficient, parse_path, score_from_velocity

VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]

# REPA's last stochastic time: the SDE steps on linspace(1, SDE_LAST_TIME, N), then to 0 by the mean.
SDE_LAST_TIME = 0.04


class SampleMode(str, Enum):
    ODE = "ode"
    SDE = "sde"


class SampleMethod(str, Enum):
    EULER = "euler"
    HEUN = "heun"


# Which integrators each mode offers.
METHODS_BY_MODE: dict[SampleMode, tuple[SampleMethod, ...]] = {
    SampleMode.ODE: (SampleMethod.EULER, SampleMethod.HEUN),
    SampleMode.SDE: (SampleMethod.EULER,),  # Euler-Maruyama
}


def _parse_enum(enum_type: type[Enum], value: Enum | str, what: str) -> Enum:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(str(value).lower())
    except ValueError:
        choices = ", ".join(repr(member.value) for member in enum_type)
        raise ValueError(f"unknown {what} {value!r}; valid choices: {choices}") from None


class PerSampleNoise:
    """Standard normal noise where row i is drawn from a torch.Generator seeded by seeds[i].

    Sample i's numbers depend only on its own seed and on how many draws it has made, never on the
    batch size or its position. The cost is one `normal_` call per row, negligible next to a model
    call. On this project's shared 2-core CPU, 256 rows of 4x32x32 took 3.6-8.1 ms over three
    timings, varying with the load (one batched `torch.randn` of the same size: 3.0-9.6 ms;
    building the 256 generators: 0.6 ms, once per batch):

        python -m timeit -s "import torch; from repa.transport.samplers import PerSampleNoise; \\
            noise = PerSampleNoise(range(256), 'cpu')" "noise.randn((4, 32, 32))"

    while one SiT-S/2 forward (fp32, no grad) on that batch took 47-59 s over two timings:

        python -m timeit -n 1 -r 1 -s "import torch; torch.set_grad_enabled(False); \\
            from repa.models import create_model; m = create_model('SiT-S/2', input_size=32).eval(); \\
            x = torch.randn(256, 4, 32, 32); t = torch.rand(256); y = torch.zeros(256, dtype=torch.long)" \\
            "m(x, t, y)"

    On a GPU each row is one small kernel launch (not measured here: no GPU was available).
    """

    def __init__(self, seeds: Sequence[int] | Tensor, device: torch.device | str = "cpu"):
        seeds = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """A (len(seeds), *shape) tensor of N(0, 1) draws, row i from generator i."""
        out = torch.empty((len(self.generators), *shape), device=self.device, dtype=dtype)
        for row, generator in zip(out, self.generators):
            row.normal_(generator=generator)
        return out


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: scale and the time interval [low, high] where it applies."""

    scale: float = 1.0
    low: float = 0.0
    high: float = 1.0
    null_label: int | None = None
    channels: int | None = None  # guide only the first N channels (None: all)
    # per-element scales of the state (broadcast over the batch), used in place of `scale` when
    # guiding; `scale` still decides whether guidance is on (None: `scale` everywhere)
    scale_map: Tensor | None = None

    def __post_init__(self) -> None:
        if self.channels is not None and (isinstance(self.channels, bool) or self.channels < 1):
            raise ValueError(f"cfg_channels must be an integer >= 1 (or None for all), got {self.channels!r}")
        for name in ("low", "high"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"guidance_{name} must lie in [0, 1] (t=0 data, t=1 noise), got {value}; "
                    "low > high is allowed and means guidance is never applied"
                )
        if self.scale != 1.0 and self.null_label is None:
            raise ValueError(f"cfg_scale={self.scale} needs null_label (the model's num_classes)")

    def active(self, t: float) -> bool:
        return self.scale != 1.0 and self.low <= t <= self.high


def guided_velocity(
    velocity_fn: VelocityFn,
    x: Tensor,
    t: float,
    labels: Tensor,
    guidance: Guidance,
    model_dtype: torch.dtype | None = None,
    guided_at: float | None = None,
) -> Tensor:
    """The (guided) velocity at time t for state x (B, ...), returned in x's dtype.

    Inside the guidance interval: one model call on 2B rows ([x; x], [labels; null]).
    Otherwise: one call on the B conditional rows only. With guidance.channels N, channels N and
    beyond take the conditional velocity. guided_at: the time whose membership of the interval
    decides whether to guide (default t; Heun's corrector passes the step's start, as REPA).
    """
    model_dtype = model_dtype or x.dtype
    batch_size = x.shape[0]
    if not guidance.active(t if guided_at is None else guided_at):
        t_batch = torch.full((batch_size,), t, device=x.device, dtype=model_dtype)
        return velocity_fn(x.to(model_dtype), t_batch, labels).to(x.dtype)
    null_labels = torch.full_like(labels, guidance.null_label)
    x_both = torch.cat([x, x]).to(model_dtype)  # (2B, ...)
    t_both = torch.full((2 * batch_size,), t, device=x.device, dtype=model_dtype)
    velocity_both = velocity_fn(x_both, t_both, torch.cat([labels, null_labels])).to(x.dtype)
    velocity_cond, velocity_uncond = velocity_both.chunk(2)
    scale = guidance.scale if guidance.scale_map is None else guidance.scale_map.to(x.device, x.dtype)
    guided = velocity_uncond + scale * (velocity_cond - velocity_uncond)
    if guidance.channels is None:
        return guided
    if guidance.channels > x.shape[1]:
        raise ValueError(f"cfg_channels {guidance.channels} exceeds the {x.shape[1]} channels of the state")
    return torch.cat([guided[:, : guidance.channels], velocity_cond[:, guidance.channels :]], dim=1)


def euler_step(
    velocity_fn: VelocityFn,
    x: Tensor,
    t_cur: float,
    t_next: float,
    labels: Tensor,
    guidance: Guidance,
    model_dtype: torch.dtype | None = None,
) -> Tensor:
    """x_next = x + (t_next - t_cur) v(x, t_cur)."""
    velocity = guided_velocity(velocity_fn, x, t_cur, labels, guidance, model_dtype)
    return x + (t_next - t_cur) * velocity


def heun_step(
    velocity_fn: VelocityFn,
    x: Tensor,
    t_cur: float,
    t_next: float,
    labels: Tensor,
    guidance: Guidance,
    model_dtype: torch.dtype | None = None,
) -> Tensor:
    """Heun (trapezoid) step: Euler predictor, then the mean of the slopes at t_cur and t_next.
    Both slopes are guided or neither, decided at t_cur (REPA's rule)."""
    dt = t_next - t_cur
    velocity = guided_velocity(velocity_fn, x, t_cur, labels, guidance, model_dtype)
    x_euler = x + dt * velocity
    velocity_next = guided_velocity(
        velocity_fn, x_euler, t_next, labels, guidance, model_dtype, guided_at=t_cur
    )
    return x + dt * (0.5 * velocity + 0.5 * velocity_next)


def euler_maruyama_step(
    velocity_fn: VelocityFn,
    x: Tensor,
    t_cur: float,
    t_next: float,
    labels: Tensor,
    guidance: Guidance,
    path: PathType | str,
    increment_noise: Tensor | None,
    model_dtype: torch.dtype | None = None,
) -> Tensor:
    """One step of the reverse SDE dx = (v - w/2 s) dt + sqrt(w) dW, with w = w(t_cur).

    increment_noise: N(0, I) draws shaped like x, or None for the mean-only last step.
    """
    dt = t_next - t_cur
    velocity = guided_velocity(velocity_fn, x, t_cur, labels, guidance, model_dtype)
    score = score_from_velocity(path, velocity, x, t_cur)
    diffusion = diffusion_coefficient(path, t_cur)
    drift = velocity - (0.5 * diffusion) * score
    x_next = x + dt * drift
    if increment_noise is not None:
        x_next = x_next + (diffusion * abs(dt)) ** 0.5 * increment_noise
    return x_next


def shift_time(t: Tensor, shift: float) -> Tensor:
    """The timestep shift t -> k t / (1 + (k - 1) t) with k = shift (1: identity; 0 and 1 stay)."""
    if not shift > 0:
        raise ValueError(f"time_shift must be > 0 (1 = no shift), got {shift!r}")
    return shift * t / (1 + (shift - 1) * t)


def time_grid(mode: SampleMode | str, num_steps: int, time_shift: float = 1.0) -> list[float]:
    """The float64 times a sampler visits, from 1 (noise) to 0 (data): num_steps + 1 values,
    each moved by the time shift (module docstring) when time_shift != 1."""
    mode = _parse_enum(SampleMode, mode, "sampling mode")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if mode is SampleMode.ODE:
        grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    else:
        grid = torch.linspace(1.0, SDE_LAST_TIME, num_steps, dtype=torch.float64)
        grid = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    if time_shift != 1.0:
        grid = shift_time(grid, time_shift)
    return grid.tolist()


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    noise_or_shape: Tensor | Sequence[int],
    labels: Tensor,
    seeds: Sequence[int] | Tensor | None = None,
    *,
    mode: SampleMode | str = SampleMode.ODE,
    method: SampleMethod | str = SampleMethod.EULER,
    num_steps: int,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_label: int | None = None,
    path: PathType | str = PathType.LINEAR,
    model_dtype: torch.dtype | None = None,
    cfg_channels: int | None = None,
    time_shift: float = 1.0,
    cfg_scale_map: Tensor | None = None,
) -> Tensor:
    """Generate a batch by integrating `velocity_fn` from t=1 to t=0.

    noise_or_shape: the initial noise (B, ...) or the per-sample shape (C, H, W); with a shape, the
        initial noise of sample i is the first draw of the generator seeded with seeds[i].
    labels: (B,) int64 class labels. seeds: one integer per sample; required to draw the initial
        noise and for the SDE's increments (sample i's trajectory depends only on seeds[i]).
    mode: "ode" | "sde"; method: "euler" | "heun" (ODE only); num_steps: model-evaluation steps
        (Heun makes 2 * num_steps - 1 evaluations).
    cfg_scale, guidance_low, guidance_high: guidance v_u + scale (v_c - v_u) for low <= t <= high.
    null_label: the unconditional class (num_classes in our models); needed when cfg_scale != 1.
    cfg_channels: guide only the first N channels of the state (DiT/SiT/LightningDiT/PixArt use 3);
        None (default) guides every channel, as REPA does.
    time_shift: k of the timestep shift t -> k t / (1 + (k - 1) t) applied to the time grid
        (1: none; LightningDiT's timestep_shift s is k = 1 / s).
    cfg_scale_map: per-sample-shaped scales used in place of cfg_scale where guidance applies (it
        applies where cfg_scale != 1 and t is in the interval), e.g. REG's two scales.
    path: "linear" | "cosine", used by the SDE's score. model_dtype: dtype of x and t given to the
        model (default: the state's dtype; under autocast leave it unset).
    Returns the final state (B, ...) in float32 (float64 if the given noise was float64).
    """
    mode = _parse_enum(SampleMode, mode, "sampling mode")
    method = _parse_enum(SampleMethod, method, "sampling method")
    if method not in METHODS_BY_MODE[mode]:
        choices = ", ".join(repr(m.value) for m in METHODS_BY_MODE[mode])
        raise ValueError(
            f"method {method.value!r} is not available for mode {mode.value!r}; valid: {choices}"
        )
    path = parse_path(path)
    grid = time_grid(mode, num_steps, time_shift)
    guidance = Guidance(
        scale=cfg_scale,
        low=guidance_low,
        high=guidance_high,
        null_label=null_label,
        channels=cfg_channels,
        scale_map=cfg_scale_map,
    )

    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
    batch_size, device = labels.shape[0], labels.device
    noise_source = None
    if seeds is not None:
        noise_source = PerSampleNoise(seeds, device)
        if len(noise_source) != batch_size:
            raise ValueError(f"got {len(noise_source)} seeds for {batch_size} labels; need one per sample")

    if isinstance(noise_or_shape, Tensor):
        if noise_or_shape.shape[0] != batch_size:
            raise ValueError(f"noise has batch {noise_or_shape.shape[0]} but labels have {batch_size}")
        state_dtype = torch.float64 if noise_or_shape.dtype == torch.float64 else torch.float32
        x = noise_or_shape.to(device=device, dtype=state_dtype)
    else:
        if noise_source is None:
            raise ValueError(
                "pass seeds (one per sample) to draw the initial noise, or pass the noise itself"
            )
        x = noise_source.randn(tuple(noise_or_shape))  # (B, C, H, W) float32
    if mode is SampleMode.SDE and noise_source is None:
        raise ValueError("the SDE sampler needs seeds (one per sample) for its noise increments")

    last = len(grid) - 2  # index of the final step
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        if mode is SampleMode.SDE:
            increment = None if i == last else noise_source.randn(x.shape[1:], dtype=x.dtype)
            x = euler_maruyama_step(
                velocity_fn, x, t_cur, t_next, labels, guidance, path, increment, model_dtype
            )
        elif method is SampleMethod.HEUN and i < last:
            x = heun_step(velocity_fn, x, t_cur, t_next, labels, guidance, model_dtype)
        else:
            x = euler_step(velocity_fn, x, t_cur, t_next, labels, guidance, model_dtype)
    return x
