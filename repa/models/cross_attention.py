"""Cross-attention conditioning on a sequence of embeddings (text tokens, or any sequence), in
PixArt-alpha's layout.

- `ContextEmbedder`: per token Linear(context_dim, D), GELU(tanh), Linear(D, D) (PixArt's caption
  projection `y_proj.fc{1,2}`), plus the null context that classifier-free guidance training puts
  in place of a dropped caption: a (context_length, context_dim) table, learned by default, or
  PixArt's fixed random buffer (randn / sqrt(context_dim), saved but never optimised).
- `CrossAttention`: q = Linear(D, D)(tokens), [k, v] = Linear(D, 2D)(context), out Linear(D, D)
  (PixArt's keys `q_linear`, `kv_linear`, `proj`), with a (B, L) key-padding mask (True = a
  real token). The block adds it as a plain residual after self-attention: no norm, no adaLN
  modulation, no gate. Its output layer starts at zero, so a new model starts text-blind.
- `CaptionVelocity`: the sampler's view of a cross-attention model (see its docstring).

A dropped caption (force_drop_ids) becomes the first L rows of the null context with every row
valid. PixArt keeps the caption's own mask there, which lets the unconditional prediction see the
caption's length; here it depends on nothing but L, the batch's padded length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

NULL_CONTEXT_MODES = ("learned", "fixed", "empty")


@dataclass
class Context:
    """A batch's projected context: tokens (B, L, D) and mask (B, L) bool (True = attend), or
    mask None when every token is real."""

    tokens: torch.Tensor
    mask: torch.Tensor | None


class ContextEmbedder(nn.Module):
    """(B, L, context_dim) embeddings -> (B, L, D) keys/values source, with CFG's null context."""

    def __init__(
        self, context_dim: int, hidden_size: int, context_length: int, null_context: str = "learned"
    ):
        super().__init__()
        if null_context not in NULL_CONTEXT_MODES:
            raise ValueError(
                f"--null-context {null_context!r} is not one of: {', '.join(NULL_CONTEXT_MODES)}"
            )
        self.context_dim = context_dim
        self.fc1 = nn.Linear(context_dim, hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        null = torch.randn(context_length, context_dim) / context_dim**0.5  # PixArt's initialisation
        self.null_mode = null_context
        if null_context == "learned":
            self.null_context = nn.Parameter(null)
        elif null_context == "fixed":  # PixArt: a buffer, saved with the weights, never optimised
            self.register_buffer("null_context", null)
        else:  # "empty" (REPA's): the text encoder's embedding of the empty caption and its mask,
            # set from the shards' null_text.npy by set_null_context; saved with the weights, so a
            # checkpoint samples without the shards
            self.register_buffer("null_context", torch.zeros(context_length, context_dim))
            self.register_buffer("null_context_mask", torch.ones(context_length, dtype=torch.bool))

    @torch.no_grad()
    def set_null_context(self, embeddings: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """null_context="empty": the empty caption's embeddings (L, context_dim) and mask (L,)."""
        if self.null_mode != "empty":
            raise ValueError(f"this model's null context is {self.null_mode!r}, not set from data")
        embeddings = torch.as_tensor(embeddings)
        if tuple(embeddings.shape) != tuple(self.null_context.shape):
            raise ValueError(
                f"the null caption must be {tuple(self.null_context.shape)} (context_length, context_dim), "
                f"got {tuple(embeddings.shape)}"
            )
        self.null_context.copy_(embeddings.float())
        self.null_context_mask.copy_(
            torch.ones(len(embeddings), dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        )

    def forward(
        self,
        context: torch.Tensor,
        mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> Context:
        """context: (B, L, context_dim); mask: (B, L) bool, True = a real token; drop: (B,) bool,
        the samples whose caption is replaced by the null context (CFG training, unconditional
        sampling)."""
        if context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context must be (B, L, {self.context_dim}) (context_dim), got {tuple(context.shape)}"
            )
        batch, length = context.shape[:2]
        if mask is not None:
            if mask.shape != (batch, length):
                raise ValueError(
                    f"context_mask must have shape {(batch, length)} (True or 1 = a real token), "
                    f"got {tuple(mask.shape)}"
                )
            mask = mask.to(device=context.device) != 0  # a tokenizer's 0/1 attention mask, or bool
            if not bool(mask.any(dim=1).all()):
                raise ValueError("context_mask: every sample needs at least one real token (a True)")
        if drop is not None:
            if length > self.null_context.shape[0]:
                raise ValueError(
                    f"context of {length} tokens is longer than the null context "
                    f"({self.null_context.shape[0]} rows, context_length): build the model with a larger one"
                )
            drop = drop.to(device=context.device, dtype=torch.bool)
            null = self.null_context[:length].to(context.dtype).expand(batch, length, -1)
            context = torch.where(drop[:, None, None], null, context)
            if self.null_mode == "empty":  # the empty caption's own mask (its padding is not attended)
                null_mask = self.null_context_mask[:length].to(context.device)
                mask = torch.ones_like(drop[:, None].expand(batch, length)) if mask is None else mask
                mask = torch.where(drop[:, None], null_mask[None], mask)
            elif mask is not None:
                mask = mask | drop[:, None]  # every row of the null context is attended
        return Context(self.fc2(self.act(self.fc1(context))), mask)  # tokens (B, L, D)


class CrossAttention(nn.Module):
    """Multi-head attention of the image tokens (queries) to the context tokens (keys, values)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        # x: (B, T, D) image tokens; context.tokens: (B, L, D)
        q = rearrange(self.q_linear(x), "b t (h d) -> b h t d", h=self.num_heads)
        kv = rearrange(
            self.kv_linear(context.tokens), "b l (two h d) -> two b h l d", two=2, h=self.num_heads
        )
        k, v = kv.unbind(0)  # each (B, heads, L, head_dim)
        mask = None if context.mask is None else context.mask[:, None, None, :]  # (B, 1, 1, L)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, T, head_dim)
        return self.proj(rearrange(x, "b h t d -> b t (h d)"))  # (B, T, D)


class CaptionVelocity:
    """`velocity_fn` for `repa.transport.samplers.sample` on a cross-attention model.

    The sampler passes its "labels" through unchanged and, for classifier-free guidance, appends
    rows of `null_label`. Here the labels are row numbers into the captions this object holds,
    and the null label (-1) selects the null context, so CFG on captions needs no sampler change:

        fn = CaptionVelocity(model, context, context_mask)
        sample(fn, (C, H, W), fn.rows, seeds, num_steps=50, cfg_scale=4.5, null_label=fn.null_label)

    `labels`: (B,) class labels for a model that also has a label embedder (num_classes > 0).
    """

    null_label = -1

    def __init__(
        self,
        model: nn.Module,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        self.model, self.context, self.context_mask, self.labels = model, context, context_mask, labels
        self.rows = torch.arange(context.shape[0], device=context.device)  # the sampler's labels

    def __call__(self, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        drop = rows == self.null_label  # (B,) bool: the unconditional half under guidance
        rows = rows.clamp(min=0)  # a dropped row's caption is replaced whole, any row will do
        mask = None if self.context_mask is None else self.context_mask[rows]
        labels = None if self.labels is None else self.labels[rows]
        return self.model.velocity(
            x, t, labels, context=self.context[rows].to(x.dtype), context_mask=mask, force_drop_ids=drop
        )
