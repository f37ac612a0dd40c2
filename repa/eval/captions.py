"""Captions for sampling a text model: prompts encoded on the fly, or the cached captions of shards.

    generator = load_generator(run_dir)
    prompts = read_prompts("prompts.txt")                         # one prompt per line
    encoder = run_text_encoder(generator.config)                  # the encoder the shards cached
    generator = generator.with_captions(*encode_prompts(encoder, prompts, generator.model), prompts)

or `generator.with_captions(*captions_from_shards(shards, limit))` (each image's first caption and
its cached embedding: the evaluation captions, e.g. COCO val2014's). The caption embeddings must
have the shape the model was trained on: the run's text encoder, and its token count.
"""

from __future__ import annotations

import os

import torch


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per non-empty line, stripped."""
    with open(path, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def run_text_encoder(config, weights: str | None = None, shards: str | None = None):
    """The text encoder whose embeddings the run trained on: the one its shards' manifest records
    (`repa data build --cache-text NAME`, with its token count). `weights`: a local transformers
    folder (--text-encoder-weights), else the packaged or hub weights (repa.text)."""
    from repa.data.shards import locate_manifest, read_manifest
    from repa.text import create_text_encoder

    shards = shards or (config.data.data if config is not None else None)
    manifest_path = locate_manifest(shards) if shards else None
    if manifest_path is None:
        raise ValueError(
            f"cannot tell which text encoder the run used: its shards ({shards or 'none recorded'}) have no "
            "manifest; pass --text-shards SHARDS (shards built with --cache-text)"
        )
    options = read_manifest(manifest_path).get("options", {})
    name = options.get("cache_text")
    if not name:
        raise ValueError(f"the shards of {manifest_path} cache no text (built without --cache-text)")
    return create_text_encoder(name, weights=weights, max_length=options.get("text_max_length"))


@torch.no_grad()
def encode_prompts(
    text_encoder, prompts: list[str], model: torch.nn.Module | None = None, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, D) float16 embeddings and (N, L) bool masks, as the shards cache them; checked
    against the model's caption width and length when given."""
    embeddings, masks = [], []
    for start in range(0, len(prompts), batch_size):
        batch_embeddings, batch_mask = text_encoder.encode(prompts[start : start + batch_size])
        embeddings.append(batch_embeddings.to(torch.float16).cpu())
        masks.append(batch_mask.bool().cpu())
    embeddings, mask = torch.cat(embeddings), torch.cat(masks)
    if model is not None:
        check_caption_shape(model, tuple(embeddings.shape[1:]))
    return embeddings, mask


def check_caption_shape(model: torch.nn.Module, shape: tuple[int, int]) -> None:
    """Captions (L, D) must be as wide as the model's context and no longer than its null caption."""
    config = model.config
    length, width = shape
    if width != config.context_dim or length > config.context_length:
        raise ValueError(
            f"captions of {length} tokens x {width} do not fit this model (trained on "
            f"{config.context_length} x {config.context_dim}): encode them with the run's text encoder"
        )


def captions_from_shards(
    shards: str, limit: int | None = None, model: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first caption of each image of SHARDS, in shard order, with its cached embedding:
    (N, L, D) float16, (N, L) bool and the N texts; at most `limit` images."""
    from repa.data.stream import iter_eval_batches

    embeddings, masks, texts = [], [], []
    for batch in iter_eval_batches(
        shards, batch_size=256, with_images=False, with_text=True, with_captions=True
    ):
        embeddings.append(batch.text)
        masks.append(batch.text_mask)
        texts.extend(batch.captions)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ValueError(f"--captions-from {shards}: no captions")
    embeddings, mask = torch.cat(embeddings)[:limit], torch.cat(masks)[:limit]
    texts = texts[:limit] if limit is not None else texts
    if model is not None:
        check_caption_shape(model, tuple(embeddings.shape[1:]))
    return embeddings, mask, texts
