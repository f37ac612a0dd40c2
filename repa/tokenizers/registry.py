"""Tokenizer registry: names -> how to build and load them; `create_tokenizer` also accepts paths.

Registered names (`list_tokenizers()`):
  pixels          identity (C=3, f=1): pixel-space diffusion, the CPU demo and the tests.
  sd-vae-ft-mse   diffusers AutoencoderKL, hub id stabilityai/sd-vae-ft-mse, latents = z * 0.18215.
  sd-vae-ft-ema   the same architecture, hub id stabilityai/sd-vae-ft-ema (REPA decodes samples with it).
  f8d4            REPA-E LDM KL-autoencoder f8 z4 (SD-VAE compatible), per-channel stats file.
  f16d32          REPA-E LDM KL-autoencoder f16 z32 (IN-VAE / E2E-VAE), per-channel stats file.
  va-vae          LightningDiT's VA-VAE f16d32 (same LDM layout), (z - mean) / std from a stats file.

A path instead of a name is recognised as follows (documented order):
  1. a folder with a diffusers `config.json` (`_class_name: AutoencoderKL`): loaded with
     AutoencoderKL.from_pretrained; latents = (z - shift_factor) * scaling_factor from that config.
  2. a file whose top level has a "tokenizer" entry naming a registered tokenizer (explicit metadata):
     that architecture, weights from the file.
  3. a file holding an LDM-layout state dict (`encoder.down.0.block.0.conv1.weight`, possibly under a
     wrapper key): the architecture is read off the key names and shapes (width, levels, res-blocks,
     attention levels, z channels) and named after the registered entry it equals (f8d4, f16d32).
  Statistics: `stats=` or the sibling `NAME-latents-stats.pt`. A diffusers-layout single file needs the
  architecture named: `create_tokenizer("sd-vae-ft-mse", weights=FILE)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from repa.tokenizers.base import LOGVAR_MIN, LatentNorm, Tokenizer, images_to_float
from repa.tokenizers.checkpoint import (
    DROPPED_PREFIXES,
    default_cache_dir,
    hub_offline,
    load_state_dict_strict,
    read_checkpoint,
    stats_sibling,
    unwrap_state_dict,
)
from repa.tokenizers.ldm import LDM_CONFIGS, LDMAutoencoderKL, LDMConfig
from repa.tokenizers.stats import load_latent_stats

# stabilityai/sd-vae-ft-mse and -ema config.json (the SD v1 VAE): 4 levels (f=8), 4 latent channels.
SD_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

WEIGHTS_HINT = "pass --tokenizer-weights PATH (weights= in Python)"


@dataclass(frozen=True)
class TokenizerSpec:
    name: str
    kind: str  # "pixels" | "diffusers" | "ldm"
    description: str
    architecture: dict | LDMConfig | None = None
    normalization: str = "identity"  # "identity" | "scalar" | "stats" (REPA-E or LightningDiT stats file)
    scale: float = 1.0
    hub_id: str | None = None
    hub_filename: str | None = None  # single-file hub repositories (VA-VAE)
    default_filename: str | None = None  # looked for in the cache dir and in a --tokenizer-weights folder
    source: str = ""  # where the published weights come from, for error messages
    extra: dict = field(default_factory=dict)


TOKENIZERS: dict[str, TokenizerSpec] = {
    spec.name: spec
    for spec in [
        TokenizerSpec("pixels", "pixels", "identity: images in [-1, 1], C=3, f=1"),
        TokenizerSpec(
            "sd-vae-ft-mse",
            "diffusers",
            "Stable Diffusion VAE fine-tuned with MSE (REPA's training VAE)",
            SD_VAE_CONFIG,
            normalization="scalar",
            scale=0.18215,
            hub_id="stabilityai/sd-vae-ft-mse",
            source="the Hugging Face hub",
        ),
        TokenizerSpec(
            "sd-vae-ft-ema",
            "diffusers",
            "Stable Diffusion VAE fine-tuned with EMA (REPA decodes samples with it)",
            SD_VAE_CONFIG,
            normalization="scalar",
            scale=0.18215,
            hub_id="stabilityai/sd-vae-ft-ema",
            source="the Hugging Face hub",
        ),
        TokenizerSpec(
            "f8d4",
            "ldm",
            "REPA-E f8d4 KL-autoencoder (SD-VAE compatible, LDM layout)",
            LDM_CONFIGS["f8d4"],
            normalization="stats",
            default_filename="sdvae-ft-mse-f8d4.pt",
            source="the REPA-E release (a VAE .pt file with its -latents-stats.pt sibling)",
        ),
        TokenizerSpec(
            "f16d32",
            "ldm",
            "REPA-E f16d32 KL-autoencoder (IN-VAE / E2E-VAE, LDM layout)",
            LDM_CONFIGS["f16d32"],
            normalization="stats",
            default_filename="invae-f16d32.pt",
            source="the REPA-E release (a VAE .pt file with its -latents-stats.pt sibling)",
        ),
        TokenizerSpec(
            "va-vae",
            "ldm",
            "LightningDiT VA-VAE f16d32 (LDM layout), (z - mean) / std",
            LDM_CONFIGS["f16d32"],
            normalization="stats",
            hub_id="hustvl/vavae-imagenet256-f16d32-dinov2",
            hub_filename="vavae-imagenet256-f16d32-dinov2.pt",
            default_filename="vavae-imagenet256-f16d32-dinov2.pt",
            source=(
                "the hub repo hustvl/vavae-imagenet256-f16d32-dinov2 (stats: LightningDiT's latents_stats.pt)"
            ),
        ),
    ]
}


def list_tokenizers() -> list[str]:
    """Registered tokenizer names."""
    return list(TOKENIZERS)


# ---- the concrete tokenizers ---------------------------------------------------------------------------
class PixelTokenizer(Tokenizer):
    """Identity: moments = (images in [-1, 1], zero std); decode rounds back to uint8 exactly."""

    def __init__(self):
        super().__init__("pixels", latent_channels=3, downsample=1, latent_norm=LatentNorm())

    def posterior(self, images_float: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A point mass; logvar sits at the LDM clamp's floor (std 3e-7) so KL-style code stays finite.
        return images_float, torch.full_like(images_float, LOGVAR_MIN)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images_to_float(images)
        return torch.cat([pixels, torch.zeros_like(pixels)], dim=1)

    def decode_float(self, z: torch.Tensor) -> torch.Tensor:
        return z


class LDMTokenizer(Tokenizer):
    """REPA-E / VA-VAE KL-autoencoders in the LDM layout."""

    def __init__(self, name: str, autoencoder: LDMAutoencoderKL, latent_norm: LatentNorm):
        config = autoencoder.config
        super().__init__(name, config.z_channels, config.downsample, latent_norm)
        self.autoencoder = autoencoder

    def posterior(self, images_float: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.autoencoder.encode(images_float)

    def decode_float(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z)


class DiffusersVAETokenizer(Tokenizer):
    """diffusers AutoencoderKL (SD-VAE)."""

    def __init__(self, name: str, autoencoder, latent_norm: LatentNorm):
        config = autoencoder.config
        downsample = 2 ** (len(config.block_out_channels) - 1)
        super().__init__(name, config.latent_channels, downsample, latent_norm)
        self.autoencoder = autoencoder

    def posterior(self, images_float: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distribution = self.autoencoder.encode(images_float).latent_dist  # logvar clamped to [-30, 20]
        return distribution.mean, distribution.logvar

    def decode_float(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z).sample


# ---- weights: where they are, and the message when they are not ----------------------------------------
def _files_dir(cache_dir: Path | None) -> Path:
    """Folder searched for single weight files: cache_dir, else $REPA_TOKENIZER_CACHE or its default."""
    return cache_dir if cache_dir is not None else default_cache_dir()


def _missing_weights_message(spec: TokenizerSpec, cache_dir: Path | None, detail: str = "") -> str:
    where = [WEIGHTS_HINT]
    if spec.default_filename:
        where.append(
            f"or put {spec.default_filename} in the cache dir {_files_dir(cache_dir)} "
            "(cache_dir= or $REPA_TOKENIZER_CACHE)"
        )
    if spec.hub_id:
        hub_cache = cache_dir if cache_dir is not None else "the Hugging Face cache ($HF_HOME)"
        where.append(
            f"or download the hub repo {spec.hub_id} where there is network access "
            f"(`huggingface-cli download {spec.hub_id}`) into {hub_cache}, or pass its local folder"
        )
    detail = f" ({detail})" if detail else ""
    return (
        f"weights for tokenizer '{spec.name}' not found{detail}. They come from {spec.source}; "
        + "; ".join(where)
        + ". Random weights are used only on explicit request (pretrained=False)."
    )


def _resolve_weights_file(
    spec: TokenizerSpec, weights: str | os.PathLike | None, cache_dir: Path | None
) -> Path:
    if weights is not None:
        path = Path(weights)
        if path.is_dir() and spec.default_filename and (path / spec.default_filename).is_file():
            return path / spec.default_filename
        if path.is_file():
            return path
        raise FileNotFoundError(
            _missing_weights_message(
                spec,
                cache_dir,
                f"{path} is not a file"
                + (f" nor a folder holding {spec.default_filename}" if spec.default_filename else ""),
            )
        )
    if spec.default_filename and (_files_dir(cache_dir) / spec.default_filename).is_file():
        return _files_dir(cache_dir) / spec.default_filename
    if spec.hub_id and spec.hub_filename:
        from huggingface_hub import hf_hub_download

        try:
            return Path(
                hf_hub_download(
                    spec.hub_id, spec.hub_filename, cache_dir=cache_dir, local_files_only=hub_offline()
                )
            )
        except Exception as error:
            raise FileNotFoundError(
                _missing_weights_message(spec, cache_dir, f"hub {spec.hub_id}/{spec.hub_filename}: {error}")
            ) from error
    raise FileNotFoundError(_missing_weights_message(spec, cache_dir))


def _latent_norm(
    spec: TokenizerSpec,
    stats: str | os.PathLike | None,
    weights_file: Path | None,
    require_stats: bool = True,
) -> LatentNorm:
    if stats is not None:
        if not Path(stats).is_file():
            raise FileNotFoundError(
                f"latent statistics file {stats} (stats= / --tokenizer-stats) does not exist"
            )
        return load_latent_stats(stats)
    if spec.normalization == "scalar":
        return LatentNorm(spec.scale)
    if spec.normalization == "identity" or weights_file is None:
        # Random weights (pretrained=False) without a stats file: no normalisation, stated here.
        return LatentNorm()
    sibling = stats_sibling(weights_file)
    if sibling.is_file():
        return load_latent_stats(sibling)
    if not require_stats:
        return LatentNorm()
    raise FileNotFoundError(
        f"latent statistics for tokenizer '{spec.name}' not found: expected {sibling} next to the weights "
        "(REPA-E's NAME-latents-stats.pt), or pass stats= / --tokenizer-stats PATH "
        "(write one with `repa tokenizer stats`)"
    )


def _looks_like_autoencoder(state_dict) -> bool:
    return "encoder.conv_in.weight" in state_dict and "decoder.conv_out.weight" in state_dict


def _is_ldm_layout(state_dict) -> bool:
    return "encoder.down.0.block.0.conv1.weight" in state_dict


# ---- builders -----------------------------------------------------------------------------------------
def _build_ldm(
    spec: TokenizerSpec,
    pretrained: bool,
    weights,
    stats,
    cache_dir: Path | None,
    overrides: dict,
    require_stats: bool = True,
    state_dict: dict | None = None,
) -> LDMTokenizer:
    config = dataclasses.replace(spec.architecture, **overrides)
    autoencoder = LDMAutoencoderKL(config)
    weights_file = None
    if pretrained:
        if state_dict is None:
            weights_file = _resolve_weights_file(spec, weights, cache_dir)
            state_dict = unwrap_state_dict(
                read_checkpoint(weights_file), _looks_like_autoencoder, str(weights_file)
            )
        else:
            weights_file = Path(weights)
        load_state_dict_strict(autoencoder, state_dict, source=f"checkpoint {weights_file}")
    elif weights is not None:
        raise ValueError("pretrained=False builds random weights; do not also pass weights=")
    return LDMTokenizer(spec.name, autoencoder, _latent_norm(spec, stats, weights_file, require_stats))


def _diffusers_from_pretrained(spec: TokenizerSpec, location: str, cache_dir: Path | None, is_hub: bool):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(
            location,
            cache_dir=cache_dir if is_hub else None,
            local_files_only=hub_offline() or not is_hub,
        )
    except Exception as error:
        raise FileNotFoundError(
            _missing_weights_message(
                spec, cache_dir, f"loading '{location}' failed: {type(error).__name__}: {error}"
            )
        ) from error


def _rename_deprecated_attention(state_dict: dict) -> dict:
    """Old diffusers files name the VAE attention query/key/value/proj_attn; now to_q/to_k/to_v/to_out.0."""
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for key, value in state_dict.items():
        for old, new in renames.items():
            if ".attentions." in key and old in key:
                key = key.replace(old, new)
        out[key] = value
    return out


# Bookkeeping scalars that LDM-layout VAE files may carry next to the weights (the EMA's decay and
# update count; other loaders ignore them too): not part of the network, dropped like "loss." keys.
LDM_BOOKKEEPING_KEYS = ("model_ema.decay", "model_ema.num_updates")


def _convert_ldm_layout(state_dict: dict, config: dict, source: str) -> dict:
    """LDM key names -> diffusers' (diffusers' own converter), refusing keys it has no place for.

    The converter takes the keys it has a rule for and silently drops the rest, so an unexpected
    key would vanish before the strict load that follows could report it. It moves tensors (renamed,
    attention weights reshaped as views) and never copies them, so an input tensor whose memory no
    output tensor uses is one it dropped.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state_dict = {
        k: v
        for k, v in state_dict.items()
        if not k.startswith(DROPPED_PREFIXES) and k not in LDM_BOOKKEEPING_KEYS
    }
    converted = convert_ldm_vae_checkpoint(state_dict, config)
    used = {v.untyped_storage().data_ptr() for v in converted.values()}
    dropped = sorted(k for k, v in state_dict.items() if v.untyped_storage().data_ptr() not in used)
    if dropped:
        shown = ", ".join(dropped[:6]) + (f" ... ({len(dropped)} in all)" if len(dropped) > 6 else "")
        raise ValueError(
            f"{source} does not match the AutoencoderKL architecture (LDM layout); unexpected keys: {shown}"
        )
    return converted


def _build_diffusers(
    spec: TokenizerSpec,
    pretrained: bool,
    weights,
    stats,
    cache_dir: Path | None,
    overrides: dict,
    require_stats: bool = True,
) -> DiffusersVAETokenizer:
    from diffusers import AutoencoderKL

    config = {**(spec.architecture or {}), **overrides}
    weights_file = None
    if not pretrained:
        if weights is not None:
            raise ValueError("pretrained=False builds random weights; do not also pass weights=")
        autoencoder = AutoencoderKL(**config)
    elif weights is None:
        autoencoder = _diffusers_from_pretrained(spec, spec.hub_id, cache_dir, is_hub=True)
    elif Path(weights).is_dir():
        autoencoder = _diffusers_from_pretrained(spec, str(weights), cache_dir, is_hub=False)
    else:
        # A single state-dict file: the architecture is the registered config; LDM-layout files (the
        # original "vae-ft-mse-840000-ema-pruned" release) are converted with diffusers' own converter.
        weights_file = _resolve_weights_file(spec, weights, cache_dir)
        state_dict = unwrap_state_dict(
            read_checkpoint(weights_file), _looks_like_autoencoder, str(weights_file)
        )
        if _is_ldm_layout(state_dict):
            state_dict = _convert_ldm_layout(state_dict, config, source=f"checkpoint {weights_file}")
        autoencoder = AutoencoderKL(**config)
        load_state_dict_strict(
            autoencoder, _rename_deprecated_attention(state_dict), source=f"checkpoint {weights_file}"
        )
    if stats is None and spec.normalization == "scalar":
        # A loaded diffusers folder carries its own scaling (and, for newer VAEs, shift) factor.
        latent_norm = LatentNorm(autoencoder.config.scaling_factor, autoencoder.config.shift_factor or 0.0)
    else:
        latent_norm = _latent_norm(spec, stats, weights_file, require_stats)
    return DiffusersVAETokenizer(spec.name, autoencoder, latent_norm)


def infer_ldm_config(state_dict: dict, resolution: int = 256) -> LDMConfig:
    """Read an LDM autoencoder's architecture off its key names and tensor shapes."""
    ch = state_dict["encoder.conv_in.weight"].shape[0]
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in state_dict:
        levels += 1
    num_res_blocks = 0
    while f"encoder.down.0.block.{num_res_blocks}.conv1.weight" in state_dict:
        num_res_blocks += 1
    ch_mult = tuple(
        state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)
    )
    attn_resolutions = tuple(
        resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state_dict
    )
    return LDMConfig(
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        attn_resolutions=attn_resolutions,
        z_channels=state_dict["post_quant_conv.weight"].shape[0],
        resolution=resolution,
    )


def _attention_levels(config: LDMConfig) -> tuple[int, ...]:
    return tuple(
        i for i in range(len(config.ch_mult)) if config.resolution // 2**i in config.attn_resolutions
    )


def _same_architecture(a: LDMConfig, b: LDMConfig) -> bool:
    return (a.ch, a.ch_mult, a.num_res_blocks, a.z_channels, _attention_levels(a)) == (
        b.ch,
        b.ch_mult,
        b.num_res_blocks,
        b.z_channels,
        _attention_levels(b),
    )


def _create_from_path(path: Path, stats, cache_dir: Path | None, require_stats: bool) -> Tokenizer:
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"{path} is a folder without a diffusers config.json; pass a checkpoint file, a diffusers "
                f"AutoencoderKL folder, or a registered name ({', '.join(TOKENIZERS)})"
            )
        class_name = json.loads(config_file.read_text()).get("_class_name")
        if class_name != "AutoencoderKL":
            raise ValueError(f"{config_file} describes a {class_name}, not a diffusers AutoencoderKL")
        spec = dataclasses.replace(TOKENIZERS["sd-vae-ft-mse"], name=path.name, architecture=None)
        return _build_diffusers(spec, True, path, stats, cache_dir, {}, require_stats)
    checkpoint = read_checkpoint(path)
    named = checkpoint.get("tokenizer")
    if isinstance(named, str):
        if named not in TOKENIZERS:
            raise ValueError(
                f"{path} names tokenizer '{named}', which is not registered ({', '.join(TOKENIZERS)})"
            )
        spec = TOKENIZERS[named]
        builder = _build_ldm if spec.kind == "ldm" else _build_diffusers
        return builder(spec, True, path, stats, cache_dir, {}, require_stats)
    state_dict = unwrap_state_dict(checkpoint, _looks_like_autoencoder, str(path))
    if not _is_ldm_layout(state_dict):
        raise ValueError(
            f"{path} holds a diffusers-layout state dict; name its architecture, e.g. "
            f"--tokenizer sd-vae-ft-mse --tokenizer-weights {path}"
        )
    config = infer_ldm_config(state_dict)
    matches = [
        s for s in TOKENIZERS.values() if s.kind == "ldm" and _same_architecture(s.architecture, config)
    ]
    # f16d32 and va-vae share the architecture; the REPA-E name (first registered) is the neutral one.
    spec = (
        matches[0]
        if matches
        else TokenizerSpec(
            f"ldm:{path.stem}",
            "ldm",
            "LDM autoencoder from a file",
            config,
            normalization="stats",
            source=str(path),
        )
    )
    spec = dataclasses.replace(spec, architecture=config)
    return _build_ldm(spec, True, path, stats, cache_dir, {}, require_stats, state_dict=state_dict)


def create_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    resolution: int = 256,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    stats: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    trainable: bool = False,
    arch_overrides: dict | None = None,
    require_stats: bool = True,
) -> Tokenizer:
    """Build a tokenizer by registered name or from a path (see the module docstring for detection).

    pretrained=False: random weights through the same construction code (for tests); otherwise weights
    come from `weights` (file or folder), the cache dir, or the hub, and a missing file is an error that
    says what to download and where to put it. `cache_dir`: where single weight files are looked for
    (default $REPA_TOKENIZER_CACHE or ~/.cache/repa/tokenizers) and the hub cache to use (default:
    Hugging Face's). HF_HUB_OFFLINE=1 forbids any download. `stats`: a latent statistics file
    overriding the default.
    `trainable`: REPA-E end-to-end training; default frozen (eval mode, no gradients).
    `arch_overrides`: architecture fields to change (test-only shrinking, e.g. {"ch": 32} or
    {"block_out_channels": [32, 32, 32, 32]}); registered names only. `require_stats=False`: build
    without a statistics file when none is found (identity normalisation), for computing one.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    name = str(name_or_path)
    overrides = dict(arch_overrides or {})
    if name in TOKENIZERS:
        spec = TOKENIZERS[name]
        if spec.kind == "pixels":
            if weights is not None or stats is not None or overrides:
                raise ValueError("the pixels tokenizer has no weights, statistics or architecture options")
            tokenizer: Tokenizer = PixelTokenizer()
        elif spec.kind == "ldm":
            tokenizer = _build_ldm(spec, pretrained, weights, stats, cache_dir, overrides, require_stats)
        else:
            tokenizer = _build_diffusers(
                spec, pretrained, weights, stats, cache_dir, overrides, require_stats
            )
    elif Path(name).exists():
        if overrides or not pretrained or weights is not None:
            raise ValueError("a tokenizer given by path takes its weights and architecture from that path")
        tokenizer = _create_from_path(Path(name), stats, cache_dir, require_stats)
    else:
        raise ValueError(
            f"unknown tokenizer '{name}': neither a registered name ({', '.join(TOKENIZERS)}) "
            "nor an existing path"
        )
    tokenizer.latent_size(resolution)  # fails early, naming valid resolutions
    return tokenizer.set_trainable(trainable)
