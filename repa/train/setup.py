"""Setting a run up: the parts (tokenizer, encoders, SiT) and the data caches to use, with every
compatibility check done before training starts.

Used by repa/train/loop.py; kept apart so the loop reads as the loop.
"""

from __future__ import annotations

import math

import torch

from repa.config import ExperimentConfig


def build_parts(
    config: ExperimentConfig,
    device: torch.device,
    model_options: dict | None = None,
    with_encoders: bool = True,
):
    """Tokenizer, frozen encoders and the SiT, with every compatibility check done before the
    SiT is built (token counts, latent sizes). `model_options`: what the training method needs
    of the model (e.g. REPA-E's latent BatchNorm). with_encoders=False (a method that no longer
    aligns, TrainingMethod.needs_encoders): no encoder is built and the list is empty, but the
    SiT keeps projectors of the encoders' widths, so that the run's checkpoints load.
    Returns (tokenizer, encoders, model)."""
    from repa.encoders import create_encoders
    from repa.models import create_model
    from repa.tokenizers import create_tokenizer

    resolution = config.data.resolution
    tokenizer = create_tokenizer(
        config.tokenizer.tokenizer,
        resolution=resolution,
        weights=config.tokenizer.tokenizer_weights,
        stats=config.tokenizer.tokenizer_stats,
    )
    latent_size = tokenizer.latent_size(resolution)
    text_shape = read_shard_manifest(config).get("text_shape")  # (L, D) of cached captions, or None
    encoders = []
    if config.encoder.enabled and with_encoders:
        encoders = create_encoders(
            config.encoder.encoder,
            resolution=resolution,
            weights=config.encoder.encoder_weights,
            cache_dir=config.encoder.encoder_cache_dir,
        )
    model_config_overrides = config.model_overrides(
        input_size=latent_size,
        in_channels=tokenizer.latent_channels,
        projector_dims=[encoder.dim for encoder in encoders] if encoders else encoder_widths(config),
        text_shape=text_shape,
    )
    model_config_overrides.update(model_options or {})
    from repa.models import config_for

    model_config = config_for(config.model.name, **model_config_overrides)
    if getattr(model_config, "context_dim", 0) and not text_shape:
        raise ValueError(
            f"{config.model.name} with --context-dim {model_config.context_dim} conditions on cached caption "
            f"embeddings, but the shards in {config.data.data} hold none: build them with `repa data build "
            "... --captions FILE --cache-text ENCODER`"
        )
    for encoder in encoders:
        if encoder.num_tokens(resolution) != model_config.num_tokens and not config.model.align_resample:
            raise ValueError(
                f"token count mismatch: {config.model.name} on {latent_size}x{latent_size} latents has "
                f"{model_config.num_tokens} tokens but {encoder.name} at {resolution}px gives "
                f"{encoder.num_tokens(resolution)}; at {resolution}px use patch size "
                f"{_matching_patch(latent_size, encoder.num_tokens(resolution))}, another resolution, or "
                "--align-resample to interpolate the encoder's tokens"
            )
    model = create_model(config.model.name, **model_config_overrides)
    if model_config_overrides.get("null_context") == "empty":
        from repa.data.shards import read_null_text

        # REPA's null caption: the text encoder's embedding of "" (built with the shards)
        model.set_null_context(*(torch.tensor(array) for array in read_null_text(config.data.data)))
    tokenizer.to(device).freeze()
    for encoder in encoders:
        encoder.to(device)
    return tokenizer, encoders, model.to(device)


def encoder_widths(config: ExperimentConfig) -> list[int]:
    """The token width of each --encoder without building it: a registered encoder's declared
    width, or a local encoder file's, read off its position table (no weights loaded)."""
    from repa.encoders import get_encoder_spec
    from repa.encoders.registry import is_local_encoder_path

    if not config.encoder.enabled:
        return []
    widths = []
    for name in (part.strip() for part in config.encoder.encoder.split(",")):
        if is_local_encoder_path(name):
            from safetensors import safe_open

            with safe_open(name, framework="pt") as weights:
                widths.append(int(weights.get_slice("pos_embed").get_shape()[-1]))
        else:
            widths.append(get_encoder_spec(name.split(":")[0]).dim)  # NAME:random keeps NAME's width
    return widths


def read_shard_manifest(config: ExperimentConfig) -> dict:
    """The shards' manifest ({} when there is none) after checking it fits the config."""
    from repa.data.shards import locate_manifest, read_manifest

    manifest_path = locate_manifest(config.data.data) if isinstance(config.data.data, str) else None
    if manifest_path is None:
        return {}
    try:
        manifest = read_manifest(manifest_path)
    except (OSError, ValueError):
        return {}
    if manifest.get("resolution") not in (None, config.data.resolution):
        raise ValueError(
            f"the shards in {config.data.data} hold {manifest['resolution']}px images but --resolution is "
            f"{config.data.resolution}; set --resolution {manifest['resolution']} or rebuild the shards"
        )
    return manifest


def cached_fields(config: ExperimentConfig, manifest: dict, tokenizer, encoders) -> tuple[bool, bool]:
    """Whether to read cached latents / features from the shards: only when the manifest says
    they were made by this run's tokenizer / (single) encoder, so a stale cache is never used.
    Features hold the class token first exactly when built with --with-class-token, which REG
    (--method reg) needs and the other methods do not read."""
    fields, options = manifest.get("fields", {}), manifest.get("options", {})
    flip = config.data.random_flip
    with_latents = (
        config.data.use_cached_latents
        and "latents" in fields
        and (not flip or "latents_flipped" in fields)
        and options.get("cache_latents") == tokenizer.name
        and tokenizer.name != "pixels"
    )
    with_features = (
        config.data.use_cached_features
        and len(encoders) == 1
        and "features" in fields
        and (not flip or "features_flipped" in fields)
        and options.get("cache_features") == encoders[0].name
        and bool(options.get("cache_class_token")) == (config.class_token_dim([encoders[0].dim]) > 0)
    )
    return bool(with_latents), bool(with_features)


def _matching_patch(latent_size: int, num_tokens: int) -> str:
    side = math.isqrt(num_tokens)
    if side * side == num_tokens and latent_size % side == 0:
        return str(latent_size // side)
    return "(none matches)"
