"""Setting a run up: the parts (tokenizer, encoders, SiT), the data caches to use, the optimisers
and the per-method step object, with every compatibility check done before training starts.

Used by repa/train/loop.py; kept apart so the loop reads as the loop.
"""

from __future__ import annotations

import math

import torch

from repa.config import ExperimentConfig
from repa.train.methods import DenoisingMethod, REPAEMethod


def build_parts(config: ExperimentConfig, device: torch.device):
    """Tokenizer, frozen encoders and the SiT, with every compatibility check done before the
    SiT is built (token counts, latent sizes). Returns (tokenizer, encoders, model)."""
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
    encoders = []
    if config.encoder.enabled:
        encoders = create_encoders(
            config.encoder.encoder,
            resolution=resolution,
            weights=config.encoder.encoder_weights,
            cache_dir=config.encoder.encoder_cache_dir,
        )
    model_config_overrides = config.model_overrides(
        input_size=latent_size,
        in_channels=tokenizer.latent_channels,
        projector_dims=[encoder.dim for encoder in encoders],
    )
    from repa.models import config_for

    model_config = config_for(config.model.name, **model_config_overrides)
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
    tokenizer.to(device).freeze()
    for encoder in encoders:
        encoder.to(device)
    return tokenizer, encoders, model.to(device)


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
    they were made by this run's tokenizer / (single) encoder, so a stale cache is never used."""
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
    )
    return bool(with_latents), bool(with_features)


def adamw(params, lr: float, config: ExperimentConfig) -> torch.optim.AdamW:
    optim = config.optim
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=(optim.adam_beta1, optim.adam_beta2),
        weight_decay=optim.adam_weight_decay,
        eps=optim.adam_epsilon,
        fused=True,
    )


def init_latent_batchnorm(model, tokenizer) -> None:
    """REPA-E: start the SiT's latent BatchNorm at the tokenizer's statistics (mean = bias,
    var = 1 / scale^2), so step 0 normalises like the tokenizer would."""
    norm = tokenizer.latent_norm
    channels = model.bn.running_mean.numel()
    model.bn.running_mean.copy_(norm.bias.float().flatten().expand(channels))
    model.bn.running_var.copy_((1.0 / norm.scale.float().flatten() ** 2).expand(channels))


def make_gradient_sync(world: int):
    """Average gradients over processes with one collective, for the modules REPA-E trains
    outside DDP (VAE, discriminator). Returns whether every process's gradients were finite."""

    def sync(params: list[torch.Tensor]) -> bool:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        flat = torch.cat([g.flatten().float() for g in grads])
        if world > 1:
            torch.distributed.all_reduce(flat)  # a NaN anywhere makes the sum NaN everywhere
            flat /= world
            offset = 0
            for grad in grads:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
        return bool(torch.isfinite(flat).all())

    return sync


def build_method(config: ExperimentConfig, tokenizer, encoders, model, accelerator):
    from repa.transport import create_time_sampler

    time_options = {}
    if config.transport.time_sampler != "uniform":
        time_options = {"location": config.transport.time_loc, "scale": config.transport.time_scale}
    common = dict(
        tokenizer=tokenizer,
        encoders=encoders,
        path=config.transport.path_type,
        time_sampler=create_time_sampler(config.transport.time_sampler, **time_options),
        proj_coeff=config.model.proj_coeff,
        autocast=accelerator.autocast,
        resample_targets=config.model.align_resample,
    )
    if config.method != "repa-e":
        return DenoisingMethod(**common)
    from repa.tokenizers.losses import LPIPS, VAELoss, VAELossConfig

    vae = config.vae
    lpips = LPIPS(vae.lpips_weights, vae.vgg_weights) if vae.lpips_weight > 0 else None
    loss_config = VAELossConfig(
        l1_weight=vae.l1_weight,
        lpips_weight=vae.lpips_weight,
        kl_weight=vae.kl_weight,
        gan_weight=vae.gan_weight,
        disc_layers=vae.disc_layers,
    )
    vae_loss = VAELoss(loss_config, lpips=lpips).to(accelerator.device)
    return REPAEMethod(
        **common,
        sit=model,
        vae_loss=vae_loss,
        vae_optimizer=adamw(
            [p for p in tokenizer.parameters() if p.requires_grad], vae.vae_learning_rate, config
        ),
        disc_optimizer=adamw(list(vae_loss.discriminator.parameters()), vae.disc_learning_rate, config),
        vae_align_coeff=vae.vae_align_coeff,
        max_grad_norm=config.optim.max_grad_norm,
        sync_gradients=make_gradient_sync(accelerator.num_processes),
    )


def _matching_patch(latent_size: int, num_tokens: int) -> str:
    side = math.isqrt(num_tokens)
    if side * side == num_tokens and latent_size % side == 0:
        return str(latent_size // side)
    return "(none matches)"
