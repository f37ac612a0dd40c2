"""DDT encoder sharing at sampling time: recompute the self-condition z only at some evaluations.

A DDT's velocity is decode(x, z) with z = encode(x, t, y), the output of its condition encoder.
Along a sampling trajectory z changes slowly, so DDT recomputes it only at scheduled model
evaluations and reuses the last one in between, where only the decoder runs (for DDT-XL/2, 6 of
28 blocks). `EncoderSharing` is the sampler's velocity function that does this; the samplers
themselves are unchanged (they call velocity_fn(x, t, labels) once per model evaluation).

Schedules (indices of the evaluations that run the encoder, evaluation 0 always among them):
  uniform   every k-th evaluation: 0, k, 2k, ... (DDT's `state_refresh_rate`; k = 1: no sharing,
            the same numbers as model.velocity, bitwise);
  dp        DDT's statistical schedule: the full sampler runs once on a fixed template batch,
            recording z at every evaluation; the cost of reusing z_j up to evaluation i is
            sum_{m=j..i} (1 - cos(z_m, z_j)) (cosine per token, averaged over tokens and samples);
            a min-sum dynamic programme places the same number of encoder runs as the uniform
            schedule, ceil(N / k), where this cost is smallest.

Classifier-free guidance: inside the guidance interval the samplers call the model on the stacked
batch [x; x] with labels [y; null] (2B rows), outside on the B conditional rows only. A z computed
on 2B rows serves a later call on B rows (its first half); a call on 2B rows after a z of B rows
(the interval begins between two scheduled evaluations) runs the encoder once more, outside the
schedule: the null rows have no z yet. `encoder_calls` counts every encoder run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

SHARE_SCHEDULES = ("uniform", "dp")


def uniform_schedule(num_evaluations: int, every: int) -> list[int]:
    """Evaluations 0, k, 2k, ... below num_evaluations."""
    if every < 1:
        raise ValueError(f"--ddt-share must be >= 1 (1: no sharing), got {every}")
    return list(range(0, num_evaluations, every))


def dp_schedule(similarity: np.ndarray, num_refreshes: int) -> list[int]:
    """The refresh evaluations that minimise the total reuse error (DDT's statistical DP).

    similarity: (N, N) mean cosine similarity between the z of every pair of evaluations.
    Segment [j, i) reuses z_j for evaluations j..i-1 and costs sum_{m=j}^{i-1} (1 - sim[m, j]).
    Returns num_refreshes segment starts (0 first), covering 0..N-1 with the least total cost;
    ties go to the earliest start.
    """
    error = 1.0 - np.asarray(similarity, dtype=np.float64)
    n = error.shape[0]
    k = max(1, min(num_refreshes, n))
    # cost[j, i] for 0 <= j < i <= n: cumulative error of columns j over rows j..i-1.
    cost = np.full((n + 1, n + 1), np.inf)
    for j in range(n):
        cost[j, j + 1 :] = np.cumsum(error[j:, j])
    best = cost[0].copy()  # one segment: [0, i)
    choices = []
    for _ in range(k - 1):
        total = best[:, None] + cost  # (j, i): best prefix ending at j, then segment [j, i)
        choices.append(np.argmin(total, axis=0))  # first minimum: the earliest start
        best = total[choices[-1], np.arange(n + 1)]
    starts, end = [], n
    for choice in reversed(choices):
        end = int(choice[end])
        starts.append(end)
    return [0] + starts[::-1]


class EncoderSharing:
    """velocity_fn(x, t, labels) for the samplers: a DDT whose encoder runs only when scheduled.

    One instance per trajectory (per `sample` call): evaluations are counted from 0.
    refresh: the evaluations that run the encoder: an int k for the uniform schedule (every k-th),
    a collection of indices (a dp schedule), or None for every evaluation.
    record_rows: keep the first record_rows rows of every z (the conditional template rows), for
    the dp calibration; `states` then holds one (record_rows, T, D) tensor per evaluation.
    """

    def __init__(self, model: nn.Module, refresh: int | Sequence[int] | None = None, record_rows: int = 0):
        if not hasattr(model, "encode") or not hasattr(model, "decode"):
            raise ValueError(
                "--ddt-share needs a DDT (a model with a condition encoder, --ddt-encoder-depth > 0)"
            )
        self.model = model
        if isinstance(refresh, int) and refresh < 1:
            raise ValueError(f"--ddt-share must be >= 1 (1: no sharing), got {refresh}")
        self.refresh = refresh if refresh is None or isinstance(refresh, int) else frozenset(refresh)
        self.record_rows = record_rows
        self.evaluation = 0
        self.encoder_calls = 0
        self.states: list[Tensor] = []
        self._z: Tensor | None = None

    def _reusable(self, rows: int) -> Tensor | None:
        if self._z is None:
            return None
        if self._z.shape[0] == rows:
            return self._z
        if self._z.shape[0] == 2 * rows:  # guidance ended: the conditional half of [y; null]
            return self._z[:rows]
        return None

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        if self.refresh is None or isinstance(self.refresh, int):
            scheduled = self.evaluation % (self.refresh or 1) == 0
        else:
            scheduled = self.evaluation in self.refresh
        z = None if scheduled else self._reusable(x.shape[0])
        if z is None:
            z = self._z = self.model.encode(x, t, labels)  # (B, T, D)
            self.encoder_calls += 1
        if self.record_rows:
            self.states.append(z[: self.record_rows].detach())
        self.evaluation += 1
        return self.model.decode(x, z)


def state_similarity(states: Sequence[Tensor]) -> np.ndarray:
    """(N, N) cosine similarity of z between evaluations, per token, averaged over tokens and rows."""
    stacked = torch.stack([s.float() for s in states])  # (N, B, T, D)
    unit = nn.functional.normalize(stacked.flatten(1, 2), dim=-1)  # (N, B*T, D)
    rows = [torch.einsum("md,nmd->n", unit[i], unit) / unit.shape[1] for i in range(unit.shape[0])]
    return torch.stack(rows).double().cpu().numpy()


@torch.no_grad()
def calibrate_dp_schedule(
    model: nn.Module, run_template: Callable[[Callable], object], every: int, template_rows: int
) -> list[int]:
    """DDT's statistical schedule for this model and sampler.

    run_template(velocity_fn) must run the sampler, with the settings that will be used, on a fixed
    template batch of `template_rows` samples (DDT: 8, fixed seeds and labels), calling velocity_fn.
    The encoder budget is ceil(N / every), N the sampler's model evaluations (the uniform count).
    """
    recorder = EncoderSharing(model, refresh=None, record_rows=template_rows)
    run_template(recorder)
    num_evaluations = len(recorder.states)
    if every <= 1:
        return list(range(num_evaluations))
    return dp_schedule(state_similarity(recorder.states), math.ceil(num_evaluations / every))
