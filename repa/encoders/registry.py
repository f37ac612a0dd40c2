"""Encoder registry: name -> how to build, load and preprocess it, and the factory functions.

Each entry is an `EncoderSpec` (data, not code): the timm architecture, the hub tag of its
weights, the token geometry and normalisation that REPA used. `create_encoder` builds every
entry through one path: fetch the checkpoint (hub or `weights=PATH`) -> build the timm ViT for
the requested resolution -> strict load -> wrap in a frozen `ViTEncoder`. `pretrained=False`
takes the same path minus the checkpoint (random weights), which is what the tests exercise.

A name that is a path to a `.safetensors` file saved by `save_local_encoder` builds that local
encoder instead (see `repa.encoders.local`).

`NAME:random` (or `NAME:random:SEED`) is the random-teacher control: NAME's architecture,
preprocessing and token grid with seeded random weights (seed 0 by default), no weight file
read. Its `name` keeps the suffix, so features cached from the trained NAME are never used
for it. The init runs on a forked RNG: building it leaves the caller's random stream as it was.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    FrozenEncoder,
    ViTEncoder,
    encoder_input_size,
)
from .weights import (
    EncoderWeightsError,
    StateDict,
    adapt_to_timm,
    download_state_dict,
    load_strict,
    missing_weights_message,
    mocov3_to_timm,
    read_state_dict_file,
)

NO_ENCODER = "none"
RANDOM_SUFFIX = "random"  # NAME:random[:SEED], the random-weights control


def split_random(name: str) -> tuple[str, int | None]:
    """'dinov2-b:random' -> ('dinov2-b', 0); 'dinov2-b:random:3' -> ('dinov2-b', 3); a name
    without the suffix -> (name, None)."""
    base, sep, tail = name.strip().rpartition(":" + RANDOM_SUFFIX)
    if sep and tail == "":
        return base, 0
    if sep and tail.startswith(":") and tail[1:].isdigit():
        return base, int(tail[1:])
    if sep or name.strip().endswith(":" + RANDOM_SUFFIX + ":"):
        raise ValueError(f"encoder {name!r}: the control is written NAME:random or NAME:random:SEED")
    return name, None


def random_name(base: str, seed: int) -> str:
    return f"{base}:{RANDOM_SUFFIX}" + (f":{seed}" if seed else "")


@dataclass(frozen=True)
class EncoderSpec:
    """How one registered encoder is built, loaded and fed."""

    name: str
    timm_arch: str  # timm architecture, e.g. "vit_base_patch14_dinov2"
    hub_tag: str | None  # timm pretrained tag ("lvd142m"); None = no hub copy, local file only
    dim: int  # token width D of the real architecture
    patch_size: int
    reference_input: int  # side the encoder sees for 256x256 images: 224 (resize) or 256 (none)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    final_norm: bool = True  # return tokens after the last LayerNorm (False: MAE, CLIP)
    resize_first: bool = False  # CLIP's reference resizes before normalising
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (MoCo v3 ViT-S heads)
    pre_filter: Callable[[StateDict], StateDict] | None = None  # original layout -> timm layout
    weights_help: str = ""  # which original file holds the weights, and where it is published
    aliases: tuple[str, ...] = ()
    reference_resolution: int = 256

    @property
    def timm_name(self) -> str | None:
        return f"{self.timm_arch}.{self.hub_tag}" if self.hub_tag else None


ENCODERS: dict[str, EncoderSpec] = {}
ALIASES: dict[str, str] = {}  # lower-case alias -> canonical name


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    """Add an encoder (and its aliases) to the registry."""
    for key in (spec.name, *spec.aliases):
        key = key.lower()
        if key in ALIASES or key == NO_ENCODER:
            raise ValueError(f"encoder name or alias '{key}' is already registered")
        ALIASES[key] = spec.name
    ENCODERS[spec.name] = spec
    return spec


def list_encoders() -> list[str]:
    """Canonical names of all registered encoders."""
    return sorted(ENCODERS)


def is_local_encoder_path(name: str) -> bool:
    """True when `name` names a local encoder file rather than a registry entry."""
    return name.endswith(".safetensors") or os.path.sep in name or os.path.isfile(name)


def canonical_encoder_name(name: str) -> str:
    """Resolve aliases (REPA's `dinov2-vit-b`, `clip-vit-L`, ...; case-insensitive) to the
    canonical registry name. Paths to local encoder files are returned unchanged; a random
    control keeps its suffix (`dinov2-vit-b:random` -> `dinov2-b:random`)."""
    base, seed = split_random(name)
    if seed is not None:
        return random_name(canonical_encoder_name(base), seed)
    if is_local_encoder_path(name):
        return name
    key = name.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    close = difflib.get_close_matches(key, list(ALIASES), n=3)
    raise ValueError(
        f"unknown encoder '{name}'{f' (did you mean {close}?)' if close else ''}. "
        f"Registered: {', '.join(list_encoders())}; '{NO_ENCODER}' for no alignment; or a path to a "
        f"local encoder .safetensors file."
    )


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec of a registered encoder (aliases accepted, a `:random` control's is its
    architecture's); `.dim` needs no model build."""
    return ENCODERS[canonical_encoder_name(split_random(name)[0])]


def create_encoder(
    name: str,
    *,
    resolution: int = 256,
    pretrained: bool = True,
    weights: str | None = None,
    cache_dir: str | None = None,
    arch_overrides: dict[str, Any] | None = None,
) -> FrozenEncoder:
    """Build a frozen encoder for square uint8 images of side `resolution`.

    Args:
        name: registry name or alias (see `list_encoders()`), or a path to a local encoder file;
            with `:random` / `:random:SEED` appended, that architecture with seeded random weights.
        pretrained: load the published weights from the hub cache (timm / Hugging Face /
            torch.hub, downloaded if online). False builds random weights on explicit request.
        weights: path to a checkpoint (.safetensors, .pth, .pt, .tar) in timm layout or in the
            encoder's original layout (DINOv2 torch.hub, OpenAI CLIP 'visual.*' or its TorchScript
            file, MoCo v3, MAE, I-JEPA); used instead of the hub whatever `pretrained` says.
            The key check is strict.
        cache_dir: hub/torch.hub cache directory (default: HF_HOME / TORCH_HOME).
        arch_overrides: timm kwargs that change the architecture (e.g. depth=2, embed_dim=64,
            num_heads=2). For tests: the same code path, patch size, token logic and
            preprocessing, at a size CI can afford. Not allowed with hub weights.

    Raises:
        EncoderWeightsError: weights requested but missing, unreadable or mismatched.
        ValueError: unknown name, or a resolution the encoder's patch grid cannot take.
    """
    base, seed = split_random(name)
    if seed is not None:
        if weights is not None:
            raise ValueError(
                f"--encoder {name} builds random weights: drop --encoder-weights ({weights}), or drop "
                f":{RANDOM_SUFFIX} to load them"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = create_encoder(
                base, resolution=resolution, pretrained=False, arch_overrides=arch_overrides
            )
        encoder.name = random_name(encoder.name, seed)
        return encoder
    if is_local_encoder_path(name):
        from .local import load_local_encoder

        if weights is not None or arch_overrides:
            raise ValueError(f"local encoder file {name} holds its own architecture and weights")
        return load_local_encoder(name, resolution=resolution, pretrained=pretrained)

    spec = get_encoder_spec(name)
    input_size = encoder_input_size(
        resolution,
        reference_resolution=spec.reference_resolution,
        reference_input=spec.reference_input,
        patch_size=spec.patch_size,
        name=spec.name,
    )
    if arch_overrides and pretrained and weights is None:
        raise ValueError(
            "arch_overrides change the architecture, so hub weights cannot fit it: "
            "use weights=PATH or pretrained=False"
        )

    # 1. the checkpoint first, so that missing weights fail before a large model is built
    checkpoint, origin = None, ""
    if weights is not None:
        checkpoint, origin = read_state_dict_file(weights, encoder_name=spec.name), weights
    elif pretrained:
        if spec.timm_name is None:
            raise EncoderWeightsError(
                missing_weights_message(
                    spec.name, None, spec.weights_help, spec.weights_help, "no hub copy exists"
                )
            )
        checkpoint = download_state_dict(
            spec.timm_name, encoder_name=spec.name, cache_dir=cache_dir, weights_help=spec.weights_help
        )
        origin = f"timm '{spec.timm_name}'"

    # 2. the network, built for this resolution's token grid (no random init when weights follow)
    vit = build_timm_vit(
        spec.timm_arch,
        img_size=input_size,
        on_meta=checkpoint is not None,
        **{**spec.arch_kwargs, **(arch_overrides or {})},
    )

    # 3. strict load (position embedding resampled to the grid on the way)
    if checkpoint is not None:
        state = adapt_to_timm(checkpoint, vit, pre_filter=spec.pre_filter)
        load_strict(vit, state, encoder_name=spec.name, origin=origin, hint=f"Expected: {spec.weights_help}.")

    return ViTEncoder(
        vit,
        name=spec.name,
        resolution=resolution,
        reference_resolution=spec.reference_resolution,
        reference_input=spec.reference_input,
        patch_size=spec.patch_size,
        mean=spec.mean,
        std=spec.std,
        final_norm=spec.final_norm,
        resize_first=spec.resize_first,
    )


def build_timm_vit(arch: str, *, img_size: int, on_meta: bool = False, **kwargs: Any) -> torch.nn.Module:
    """A timm VisionTransformer without classifier or pooling head. `on_meta` skips random
    initialisation (for a checkpoint that `load_strict` will assign)."""
    import timm

    kwargs = {"num_classes": 0, "global_pool": "", **kwargs}
    if on_meta:
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False, img_size=img_size, **kwargs)
    return timm.create_model(arch, pretrained=False, img_size=img_size, **kwargs)


def create_encoders(spec: str, **kwargs: Any) -> list[FrozenEncoder]:
    """Comma-separated names -> encoders (one projector each downstream); 'none' or '' -> []."""
    names = [part.strip() for part in (spec or "").split(",") if part.strip()]
    if [n.lower() for n in names] in ([], [NO_ENCODER]):
        return []
    if any(n.lower() == NO_ENCODER for n in names):
        raise ValueError(f"'{NO_ENCODER}' cannot be combined with other encoders: {spec!r}")
    canonical = [canonical_encoder_name(n) for n in names]
    duplicates = sorted({n for n in canonical if canonical.count(n) > 1})
    if duplicates:
        raise ValueError(f"encoder(s) listed twice in {spec!r}: {duplicates}")
    return [create_encoder(n, **kwargs) for n in canonical]


# ---- the registered encoders (facts: docs/conventions.md, "Encoders") ---------------------

_DINOV2_SIZES = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}
for _size, (_timm_size, _dim) in _DINOV2_SIZES.items():
    for _reg in (False, True):
        _suffix = "-reg" if _reg else ""
        _file = f"dinov2_vit{_size}14{'_reg4' if _reg else ''}_pretrain.pth"
        register_encoder(
            EncoderSpec(
                name=f"dinov2-{_size}{_suffix}",
                timm_arch=f"vit_{_timm_size}_patch14{'_reg4' if _reg else ''}_dinov2",
                hub_tag="lvd142m",
                dim=_dim,
                patch_size=14,
                reference_input=224,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                weights_help=f"the torch.hub DINOv2 file {_file} (https://dl.fbaipublicfiles.com/dinov2/) "
                f"or timm's model.safetensors (hf.co/timm/vit_{_timm_size}_patch14{'_reg4' if _reg else ''}"
                f"_dinov2.lvd142m)",
                aliases=(f"dinov2-vit-{_size}{_suffix}", f"dinov2reg-vit-{_size}")
                if _reg
                else (f"dinov2-vit-{_size}",),
            )
        )

register_encoder(
    EncoderSpec(
        name="dinov1-b",
        timm_arch="vit_base_patch16_224",
        hub_tag="dino",
        dim=768,
        patch_size=16,
        reference_input=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_help="dino_vitbase16_pretrain.pth (https://dl.fbaipublicfiles.com/dino/) or hf.co/timm/"
        "vit_base_patch16_224.dino",
        aliases=("dinov1-vit-b",),
    )
)

register_encoder(
    EncoderSpec(
        name="clip-l",
        # OpenAI CLIP uses QuickGELU; timm's plain `vit_large_patch14_clip_224` uses GELU.
        timm_arch="vit_large_patch14_clip_quickgelu_224",
        hub_tag="openai",
        dim=1024,
        patch_size=14,
        reference_input=224,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        final_norm=False,  # transformer output: no ln_post, no projection
        resize_first=True,
        weights_help="a state dict of OpenAI CLIP ViT-L/14 ('visual.*' keys, e.g. "
        "torch.save(clip.load('ViT-L/14')[0].state_dict(), PATH)) or "
        "hf.co/timm/vit_large_patch14_clip_224.openai",
        aliases=("clip-vit-l", "clip-vit-l-14"),
    )
)

register_encoder(
    EncoderSpec(
        name="siglip-b",
        # the 256-px SigLIP-B/16: 16x16 tokens at 256 without a resize (the 224 model gives 14x14)
        timm_arch="vit_base_patch16_siglip_256",
        hub_tag="webli",
        dim=768,
        patch_size=16,
        reference_input=256,
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
        weights_help="hf.co/timm/vit_base_patch16_siglip_256.webli (model.safetensors)",
        aliases=("siglip-vit-b",),
    )
)

for _size, _arch, _dim, _extra in (
    ("s", "vit_small_patch16_224", 384, {"num_heads": 12}),  # MoCo v3 ViT-S has 12 heads, timm's 6
    ("b", "vit_base_patch16_224", 768, {}),
    ("l", "vit_large_patch16_224", 1024, {}),
):
    register_encoder(
        EncoderSpec(
            name=f"mocov3-{_size}",
            timm_arch=_arch,
            hub_tag=None,
            dim=_dim,
            patch_size=16,
            reference_input=256,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            arch_kwargs=_extra,
            pre_filter=mocov3_to_timm,
            weights_help=f"the MoCo v3 ViT-{_size.upper()} checkpoint (vit-{_size}-300ep.pth.tar, "
            f"https://github.com/facebookresearch/moco-v3 CONFIG.md; REPA's ckpts/mocov3_vit{_size}.pth)",
            aliases=(f"mocov3-vit-{_size}",),
        )
    )

register_encoder(
    EncoderSpec(
        name="mae-l",
        timm_arch="vit_large_patch16_224",
        hub_tag="mae",
        dim=1024,
        patch_size=16,
        reference_input=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        final_norm=False,
        weights_help="mae_pretrain_vit_large.pth (https://dl.fbaipublicfiles.com/mae/pretrain/) or "
        "hf.co/timm/vit_large_patch16_224.mae",
        aliases=("mae-vit-l",),
    )
)

register_encoder(
    EncoderSpec(
        name="jepa-h",
        timm_arch="vit_huge_patch14_gap_224",  # no class token; `norm` is I-JEPA's final norm
        hub_tag="in1k_ijepa",
        dim=1280,
        patch_size=14,
        reference_input=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        arch_kwargs={"fc_norm": False},
        weights_help="the I-JEPA checkpoint IN1K-vit.h.14-300e.pth.tar "
        "(https://dl.fbaipublicfiles.com/ijepa/; REPA's ckpts/ijepa_vith.pth)",
        aliases=("jepa-vit-h", "ijepa-h"),
    )
)
