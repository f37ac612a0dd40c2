"""Local encoders: a small timm ViT trained here (e.g. by the CPU demo) saved as one file that
`create_encoder(PATH)` rebuilds like any registered encoder.

The file is a .safetensors state dict whose metadata holds everything needed to rebuild it:
the timm architecture name and kwargs, an optional convolutional stem, the normalisation, and
the token geometry. Train the network that `build_local_vit` returns, then `save_local_encoder`.

A plain tiny ViT barely learns on a CPU in minutes (docs/cpu.md); a small
batch-norm conv stem before a few transformer blocks does. timm provides the pieces:
`ConvStem` (stride-2 conv + BN + ReLU layers, plain last conv) feeding `HybridEmbed`, so
`conv_stem={"channels": [32, 64], "stride": [2, 2], "kernel_size": 3, "padding": 1}` with
`patch_size=1` gives one token per 4x4 pixels.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from .base import ViTEncoder
from .weights import EncoderWeightsError, adapt_to_timm, load_strict, read_state_dict_file

FORMAT = "repa-local-encoder/1"


def build_local_vit(
    arch: str,
    arch_kwargs: dict[str, Any],
    *,
    conv_stem: dict[str, Any] | None = None,
    img_size: int | None = None,
) -> nn.Module:
    """Build the timm VisionTransformer `arch` with `arch_kwargs` (JSON-serialisable: img_size,
    patch_size, depth, embed_dim, num_heads, num_classes, ...), optionally with a timm ConvStem
    (kwargs of `timm.models.vision_transformer_hybrid.ConvStem`) in front as a hybrid embedding.
    `img_size` overrides `arch_kwargs['img_size']` (used to rebuild at another resolution)."""
    import timm
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer_hybrid import ConvStem

    kwargs = dict(arch_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if conv_stem is not None:
        stem_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in conv_stem.items()}
        if "channels" in stem_kwargs and "depth" not in stem_kwargs:
            stem_kwargs["depth"] = len(stem_kwargs["channels"])
        kwargs["embed_layer"] = partial(HybridEmbed, backbone=ConvStem(**stem_kwargs))
        kwargs.setdefault("patch_size", 1)  # patch size on the stem's feature map
    return timm.create_model(arch, pretrained=False, **kwargs)


def save_local_encoder(
    path: str,
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: dict[str, Any],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    input_size: int,
    patch_size: int,
    resolution: int | None = None,
    conv_stem: dict[str, Any] | None = None,
    final_norm: bool = True,
    name: str | None = None,
) -> None:
    """Save `model` (built by `build_local_vit(arch, arch_kwargs, conv_stem=conv_stem)`) as a
    local encoder file.

    Args:
        input_size: side of the square the encoder sees (its `img_size`).
        patch_size: pixels per token side in that input (stem stride x patch size for hybrids).
        resolution: image side this encoder is meant for (default `input_size`: no resize); at
            another resolution R it sees `input_size * R / resolution` pixels.
        final_norm: return tokens after the final LayerNorm.
        name: display name (default: the file name).
    """
    import os

    from safetensors.torch import save_file

    grid = tuple(model.patch_embed.grid_size)
    if grid != (input_size // patch_size,) * 2 or input_size % patch_size:
        raise ValueError(
            f"model has a {grid} token grid; input_size={input_size} with patch_size={patch_size} "
            f"would give {input_size // patch_size}x{input_size // patch_size}"
        )
    metadata = {
        "format": FORMAT,
        "name": name or os.path.splitext(os.path.basename(path))[0],
        "arch": arch,
        "arch_kwargs": json.dumps(arch_kwargs),
        "conv_stem": json.dumps(conv_stem),
        "mean": json.dumps([float(m) for m in mean]),
        "std": json.dumps([float(s) for s in std]),
        "input_size": str(input_size),
        "patch_size": str(patch_size),
        "resolution": str(resolution or input_size),
        "final_norm": json.dumps(final_norm),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata=metadata)


def load_local_encoder(path: str, *, resolution: int | None = None, pretrained: bool = True) -> ViTEncoder:
    """Rebuild a file written by `save_local_encoder` as a frozen encoder for images of side
    `resolution` (default: the one it was saved for). Strict key check; `pretrained=False`
    builds the same architecture with random weights."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:
        raise EncoderWeightsError(
            f"cannot read local encoder file {path}: {type(err).__name__}: {err}"
        ) from err
    if metadata.get("format") != FORMAT:
        raise EncoderWeightsError(
            f"{path} is not a local encoder file (metadata format {metadata.get('format')!r}, expected "
            f"{FORMAT!r}); write it with repa.encoders.save_local_encoder"
        )
    name = metadata["name"]
    reference_resolution = int(metadata["resolution"])
    reference_input = int(metadata["input_size"])
    patch_size = int(metadata["patch_size"])
    resolution = resolution or reference_resolution
    encoder_kwargs = dict(
        name=name,
        resolution=resolution,
        reference_resolution=reference_resolution,
        reference_input=reference_input,
        patch_size=patch_size,
        mean=tuple(json.loads(metadata["mean"])),
        std=tuple(json.loads(metadata["std"])),
        final_norm=json.loads(metadata["final_norm"]),
    )
    from .base import encoder_input_size

    input_size = encoder_input_size(
        resolution,
        reference_resolution=reference_resolution,
        reference_input=reference_input,
        patch_size=patch_size,
        name=name,
    )
    build = partial(
        build_local_vit,
        metadata["arch"],
        json.loads(metadata["arch_kwargs"]),
        conv_stem=json.loads(metadata["conv_stem"]),
        img_size=input_size,
    )
    if not pretrained:
        return ViTEncoder(build(), **encoder_kwargs)
    state = read_state_dict_file(path, encoder_name=name)
    with torch.device("meta"):
        vit = build()
    load_strict(vit, adapt_to_timm(state, vit), encoder_name=name, origin=path)
    return ViTEncoder(vit, **encoder_kwargs)
