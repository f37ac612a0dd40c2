"""One optimiser step of any training method: the loop's single policy for every update.

For each micro-batch the method yields one loss per parameter group (repa.train.methods.base);
each is backpropagated into its own group only (`backward(inputs=...)`), scaled by the fp16 grad
scaler when there is one. After the last micro-batch: gradients of groups outside DDP are
averaged across processes; every group is unscaled and clipped; one collective carries every
group's non-finite flags, the stop request and the skipped-sample count; then either every
group steps (and the EMA follows the diffusion model) or, if anything anywhere was non-finite,
no group does. `repa bench` times this same function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from repa.train.ema import EMA
from repa.train.methods.base import ParamGroup, TrainingMethod
from repa.train.randomness import StepNoise, derive_seed


@dataclass
class StepOutcome:
    skipped: bool  # no group was updated: a loss or gradient was non-finite on some rank
    nonfinite: bool  # counts towards --max-nonfinite-steps (in fp16, overflow alone does not)
    stop: bool  # some rank was asked to stop (a signal)
    data_skipped: int  # corrupt samples skipped so far, summed over ranks
    samples: int  # samples this rank trained on
    metrics: dict[str, torch.Tensor]  # the method's, averaged over micro-batches (no host sync)
    grad_norms: dict[str, torch.Tensor]  # per group, before clipping


def _no_context() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class StepRunner:
    """The loop's step. `model` is the diffusion model as it runs forward (DDP-wrapped,
    compiled); `unwrapped` is the module whose weights the EMA follows."""

    def __init__(
        self,
        method: TrainingMethod,
        model: nn.Module,
        unwrapped: nn.Module,
        ema: EMA | None,
        *,
        accumulation: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        autocast: Callable[[], contextlib.AbstractContextManager] = _no_context,
        no_sync: Callable[[], contextlib.AbstractContextManager] = _no_context,
        scaler: torch.amp.GradScaler | None = None,
    ):
        self.method, self.model, self.unwrapped, self.ema = method, model, unwrapped, ema
        self.groups: list[ParamGroup] = method.groups()
        names = [group.name for group in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"parameter group names must differ, got {names}")
        self.by_name = {group.name: group for group in self.groups}
        self.accumulation, self.seed, self.rank, self.world_size = accumulation, seed, rank, world_size
        self.device = torch.device(device)
        self.autocast, self.no_sync, self.scaler = autocast, no_sync, scaler

    def model_group(self) -> ParamGroup:
        return next(group for group in self.groups if group.module is self.unwrapped)

    def run(
        self, step: int, batches: Iterator, host_status: Callable[[], tuple[bool, int]] = lambda: (False, 0)
    ) -> StepOutcome:
        """Train step `step` (0-based) on `accumulation` batches from `batches`. `host_status`,
        read after the step's work: (this process was asked to stop, samples it skipped so far)."""
        torch.manual_seed(derive_seed(self.seed, self.rank, step))  # anything outside StepNoise
        for group in self.groups:
            if group.learning_rate is not None:
                for param_group in group.optimizer.param_groups:
                    param_group["lr"] = group.learning_rate(step)
        self.model.train()
        for group in self.groups:  # nothing left over from a step abandoned by an exception
            group.optimizer.zero_grad(set_to_none=True)
        try:
            loss_nonfinite, metrics, samples = self._accumulate(step, batches)
        except BaseException:
            self.method.finish_step(updated=False)
            raise
        grad_norms = self._reduce_and_clip()
        # One collective: every group's non-finite loss and gradient, the stop request, and the
        # skipped-sample count, so that all ranks take the same decision.
        grad_nonfinite = torch.stack([(~torch.isfinite(norm)).float() for norm in grad_norms.values()])
        stop_requested, data_skipped = host_status()
        host = torch.tensor([float(stop_requested), float(data_skipped)], device=self.device)
        flags = torch.cat([loss_nonfinite, grad_nonfinite.to(self.device), host])
        if self.world_size > 1:
            torch.distributed.all_reduce(flags)
        flags = flags.tolist()  # the step's one host sync
        count = len(self.groups)
        any_loss, any_grad = sum(flags[:count]) > 0, sum(flags[count : 2 * count]) > 0
        skipped = any_loss or any_grad
        if skipped:
            for group in self.groups:
                group.optimizer.zero_grad(set_to_none=True)
        else:
            for group in self.groups:
                if self.scaler is not None:
                    self.scaler.step(group.optimizer)
                else:
                    group.optimizer.step()
                group.optimizer.zero_grad(set_to_none=True)
        self.method.finish_step(updated=not skipped)
        if not skipped and self.ema is not None:
            self.ema.update(self.unwrapped)
        if self.scaler is not None:
            self.scaler.update()  # lowers the scale after an overflow; every group was unscaled
        return StepOutcome(
            skipped=skipped,
            # the grad scaler owns fp16 overflow (it lowers its scale), so only a non-finite loss
            # counts there
            nonfinite=any_loss or (any_grad and self.scaler is None),
            stop=flags[-2] > 0,
            data_skipped=int(flags[-1]),
            samples=samples,
            metrics=metrics,
            grad_norms=grad_norms,
        )

    def _accumulate(self, step: int, batches: Iterator) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Every micro-batch's losses, backpropagated into their groups. Returns the per-group
        non-finite loss counts, the metrics averaged over micro-batches, and the samples."""
        index = {group.name: k for k, group in enumerate(self.groups)}
        loss_nonfinite = torch.zeros(len(self.groups), device=self.device)
        metrics: dict[str, torch.Tensor] = {}
        noise: StepNoise | None = None
        samples = 0
        for micro in range(self.accumulation):
            batch = next(batches)
            size = len(batch)
            if noise is None:  # every micro-batch of a rank has the same size
                seed = derive_seed(self.seed, self.rank, step, 1)
                noise = StepNoise(seed, size * self.accumulation, self.device)
            noise.select(micro * size, (micro + 1) * size)
            last = micro == self.accumulation - 1
            # closing: a method's clean-up (REPA-E unfreezes the SiT) runs even when a backward
            # pass fails half-way
            with (
                contextlib.nullcontext() if last else self.no_sync(),
                contextlib.closing(self.method.losses(self.model, batch, noise)) as losses,
            ):
                while True:
                    with self.autocast():
                        item = next(losses, None)
                    if item is None:
                        break
                    group = self.by_name[item.group]
                    loss_nonfinite[index[item.group]] += (~torch.isfinite(item.loss.detach())).float()
                    scaled = item.loss / self.accumulation
                    if self.scaler is not None:
                        scaled = self.scaler.scale(scaled)
                    scaled.backward(inputs=group.params)
                    for key, value in item.metrics.items():
                        metrics[key] = metrics.get(key, 0.0) + value.detach() / self.accumulation
            samples += size
        return loss_nonfinite, metrics, samples

    def _reduce_and_clip(self) -> dict[str, torch.Tensor]:
        """Average the gradients DDP does not (groups other than the wrapped model's), unscale,
        clip each group to its own norm. Returns the norms before clipping."""
        norms = {}
        for group in self.groups:
            # A parameter no loss reached this step gets a zero gradient, so that every rank runs
            # the same collectives on the same sizes and the grad scaler sees every group.
            for p in group.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in group.params]
            if self.world_size > 1 and group.module is not self.unwrapped:
                flat = torch.cat([g.flatten().float() for g in grads])
                torch.distributed.all_reduce(flat)  # a NaN anywhere makes the sum NaN everywhere
                flat /= self.world_size
                offset = 0
                for grad in grads:
                    grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                    offset += grad.numel()
            if self.scaler is not None:
                self.scaler.unscale_(group.optimizer)
            max_norm = group.max_grad_norm if group.max_grad_norm > 0 else float("inf")
            norms[group.name] = torch.nn.utils.clip_grad_norm_(group.params, max_norm)
        return norms
