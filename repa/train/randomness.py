"""The random draws of a training step, independent of how the step is cut into micro-batches.

Every process reseeds from (seed, rank, step), so a resumed run draws what an uninterrupted one
would. Within a step, each named quantity (the training times, the diffusion noise, the
posterior's eps, the label-dropout coin) is drawn once for all of the rank's samples of that
step from its own generator, and each micro-batch takes its slice. Gradient accumulation
therefore changes only how the samples are batched, not which t and noise they get: a run with
--gradient-accumulation-steps 2 trains on the same draws as one with 1 at the same global batch.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, step, ...), stable across Python versions."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class StepNoise:
    """Named random tensors for the `num_samples` samples one rank trains on in one step.

    `select(start, stop)` picks the current micro-batch; `draw(name, make)` returns that slice of
    `make(num_samples, generator)`, computed on the first request of `name` in this step.
    """

    def __init__(self, seed: int, num_samples: int, device: torch.device | str):
        self.seed, self.num_samples, self.device = seed, num_samples, torch.device(device)
        self.start, self.stop = 0, num_samples
        self._drawn: dict[str, torch.Tensor] = {}

    def select(self, start: int, stop: int) -> None:
        if not 0 <= start < stop <= self.num_samples:
            raise ValueError(f"micro-batch [{start}, {stop}) outside the step's {self.num_samples} samples")
        self.start, self.stop = start, stop

    def generator(self, name: str) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(derive_seed(self.seed, zlib.crc32(name.encode())))
        return generator

    def draw(self, name: str, make: Callable[[int, torch.Generator], torch.Tensor]) -> torch.Tensor:
        if name not in self._drawn:
            self._drawn[name] = make(self.num_samples, self.generator(name))
        return self._drawn[name][self.start : self.stop]

    def normal(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(micro-batch, *shape) standard normal."""
        return self.draw(
            name, lambda n, g: torch.randn((n, *shape), generator=g, device=self.device, dtype=dtype)
        )

    def uniform(self, name: str) -> torch.Tensor:
        """(micro-batch,) uniform on [0, 1)."""
        return self.draw(name, lambda n, g: torch.rand(n, generator=g, device=self.device))

    def permutations(self, name: str, size: int) -> torch.Tensor:
        """(micro-batch, size) int64: a uniform random permutation of range(size) per sample."""
        return self.draw(
            name, lambda n, g: torch.rand((n, size), generator=g, device=self.device).argsort(dim=1)
        )
