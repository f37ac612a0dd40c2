"""TREAD token routing (Krause et al., ICCV 2025), training only.

During training each sample keeps a random (1 - r) N of its N tokens through blocks
start..end (0-based, both inclusive, TREAD's `start_layer_idx` / `end_layer_idx`); the other
r N tokens skip those blocks and re-enter after block `end` with the values they had before block
`start` (identity over the route). No new parameters and no mask token; gradients reach the
skipped tokens through the saved copy. Published placement: start 2, end depth - 4 (absolute for
every size: 2 -> 24 for 28 blocks), r = 0.5. In eval mode the model never routes, so sampling,
evaluation and the EMA model run the plain network.

Which tokens are kept is given by `route_ids`, a (B, N) permutation per sample (the training
method draws it with the step's other randomness, so resume is bitwise): the first (1 - r) N
entries are the kept token indices. Whatever sees the kept tokens only (the REPA tap inside the
route) gets them in that order, so targets are gathered with the same indices (`gather_tokens`).
With RoPE, the rotation tables are gathered with the same indices (`RoutedRope`).
"""

from __future__ import annotations

import torch
from torch import nn

from repa.models.rope import RotaryEmbedding2D, rotate_pairs


def num_kept_tokens(num_tokens: int, ratio: float) -> int:
    """Tokens per sample inside the route: (1 - ratio) N, rounded down (TREAD's `int`)."""
    return int(num_tokens * (1 - ratio))


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, D) tokens, (B, K) int64 indices -> (B, K, D): per sample, the tokens at ids."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def random_route_ids(batch: int, num_tokens: int, device, generator: torch.Generator | None = None):
    """(B, N) int64: one uniform random permutation of range(N) per sample."""
    return torch.rand((batch, num_tokens), generator=generator, device=device).argsort(dim=1)


class RoutedRope(nn.Module):
    """The model's 2-D RoPE restricted to each sample's kept tokens: (B, heads, K, d) -> rotated."""

    def __init__(self, rope: RotaryEmbedding2D, kept_ids: torch.Tensor):
        super().__init__()
        # plain attributes, not buffers: built per forward pass, never saved
        self.freqs_cos = rope.freqs_cos[kept_ids].unsqueeze(1)  # (B, 1, K, d)
        self.freqs_sin = rope.freqs_sin[kept_ids].unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.freqs_cos + rotate_pairs(x) * self.freqs_sin).to(x.dtype)


class TokenRoute:
    """One forward pass's route: `leave` before block `start`, `rejoin` after block `end`."""

    def __init__(self, start: int, end: int, route_ids: torch.Tensor, num_kept: int):
        self.start, self.end = start, end
        self.kept_ids = route_ids[:, :num_kept]  # (B, K)
        self._saved: torch.Tensor | None = None

    def leave(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, K, D) kept tokens; the full set is saved for `rejoin`."""
        self._saved = tokens
        return gather_tokens(tokens, self.kept_ids)

    def rejoin(self, kept: torch.Tensor) -> torch.Tensor:
        """(B, K, D) processed kept tokens -> (B, N, D), the skipped ones at their saved values."""
        index = self.kept_ids.unsqueeze(-1).expand(-1, -1, kept.shape[-1])
        full = self._saved.scatter(1, index, kept.to(self._saved.dtype))
        self._saved = None
        return full

    def rope(self, rope: RotaryEmbedding2D | None) -> RoutedRope | None:
        return None if rope is None else RoutedRope(rope, self.kept_ids)
