"""Feature spaces for the metrics: uint8 images in, named float32 feature sets out.

    space = create_feature_space("inception", weights="weights-inception-2015-12-05-6726825d.pth")
    features = space(images_uint8)   # {"pool": (B, 2048), "logits": (B, 1008), "spatial": (B, 2023)}

A feature space is any object with a `name` (its identity in reference-statistics caches; it must
change when the weights change), a tuple `provides` of the feature-set names it returns, and
`__call__(images uint8 (B, 3, H, W)) -> {feature name: float32 (B, F)}`. Registered spaces:

  inception   torch-fidelity's `FeatureExtractorInceptionV3` (the TF-compatible FID Inception):
              pool = pool3 (2048-d, FID and precision/recall), logits = logits_unbiased (IS, as
              torch-fidelity computes it), spatial = the first 7 channels of mixed_6/conv
              (torch port: Mixed_6d.branch1x1) flattened channels-last to 17*17*7 = 2023 (sFID,
              as the ADM evaluator defines it).
  dinov2      the DINOv2 ViT-L/14 final-norm class token (FD-DINOv2) with torch-fidelity's DINOv2
              preprocessing (TF-style bilinear resize to 224, ImageNet normalisation); weights via
              repa.encoders (timm hub cache or a local file), because torch-fidelity's own DINOv2
              extractor only loads from torch.hub and refuses a local weights path.

`CallableFeatures(fn, name)` turns any `fn(uint8 images) -> (B, F)` into a space providing
"features" (the CPU demo scores with its own small evaluator network this way).

Weights: Inception comes from torch-fidelity's release URL (downloaded into the torch hub cache
when online), a local file, or a folder holding the file. torch-fidelity does not check the file;
we compare its SHA-256 with the prefix torch.hub's naming convention puts in the published file
name (`...-6726825d.pth`) before loading it. Offline without the file, the error names the file,
its URL and where to put it. Nothing here falls back to random weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from repa.utils.files import file_sha256

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILENAME = INCEPTION_URL.rsplit("/", 1)[1]
# torch.hub convention: `name-<first hex digits of the SHA-256>.ext` (torch.hub.HASH_REGEX).
INCEPTION_SHA256_PREFIX = "6726825d"
# The spatial features of sFID: the first 7 channels of the 17x17 mixed_6/conv map (ADM evaluator).
SFID_CHANNELS = 7


class FeatureSpace(Protocol):
    name: str
    provides: tuple[str, ...]

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


def _check_uint8_images(images: torch.Tensor, who: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(
            f"{who} takes uint8 images (B, 3, H, W), got {getattr(images, 'dtype', type(images))}"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{who} takes images shaped (B, 3, H, W), got {tuple(images.shape)}")


# ---- Inception -----------------------------------------------------------------------------------


def resolve_inception_weights(
    weights: str | os.PathLike | None = None,
    *,
    expected_sha256: str | None = INCEPTION_SHA256_PREFIX,
    download: bool = True,
) -> Path:
    """The local path of the FID Inception weights, checked against `expected_sha256`.

    weights: a file; a folder holding INCEPTION_FILENAME; or None for the torch hub cache
        (`$TORCH_HOME/hub/checkpoints/`), downloading it there when missing and `download`.
    expected_sha256: full hash or prefix the file's SHA-256 must start with; None skips the check
        (for weights you made yourself, e.g. tests).
    """
    if weights is not None:
        path = Path(weights)
        if path.is_dir():
            path = path / INCEPTION_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found at {path}. Download {INCEPTION_URL} on a machine with network "
                f"access and pass the file (or its folder) with --inception-weights"
            )
    else:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        path = cache / INCEPTION_FILENAME
        if not path.is_file():
            error: Exception | None = None
            if download:
                try:
                    cache.mkdir(parents=True, exist_ok=True)
                    torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=True)
                except Exception as exc:  # noqa: BLE001 - any network failure means "offline"
                    error = exc
            if not path.is_file():
                reason = f" (download failed: {error})" if error else ""
                raise FileNotFoundError(
                    f"Inception weights for FID/IS/sFID/precision-recall not found{reason}. Download "
                    f"{INCEPTION_URL} on a machine with network access and either put {INCEPTION_FILENAME} "
                    f"in {cache} (the torch hub cache, $TORCH_HOME) or pass --inception-weights PATH"
                )
    if expected_sha256:
        actual = file_sha256(path)
        if not actual.startswith(expected_sha256.lower()):
            raise ValueError(
                f"Inception weights {path} have SHA-256 {actual}, expected {expected_sha256}... (the "
                f"published {INCEPTION_FILENAME}). Replace the file, or pass --inception-sha256 none "
                "to use weights of your own"
            )
    return path


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID Inception: pool (B, 2048), logits (B, 1008), spatial (B, 2023)."""

    provides = ("pool", "logits", "spatial")

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        *,
        expected_sha256: str | None = INCEPTION_SHA256_PREFIX,
        internal_dtype: str = "float32",
    ):
        super().__init__()
        from torch_fidelity import FeatureExtractorInceptionV3

        path = resolve_inception_weights(weights, expected_sha256=expected_sha256)
        self.extractor = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(path),
            feature_extractor_internal_dtype=internal_dtype,
        )
        # The cache identity includes the weights' hash: statistics from other weights never mix.
        self.name = f"inception-v3-compat-{file_sha256(path)[:12]}-{internal_dtype}"
        self._spatial: torch.Tensor | None = None
        self.extractor.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        # (B, 192, 17, 17) -> first 7 channels, channels-last flatten -> (B, 17*17*7)
        self._spatial = output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_uint8_images(images, "the Inception feature extractor")
        device = next(self.extractor.parameters()).device
        pool, logits = self.extractor(images.to(device))
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "logits": logits, "spatial": spatial}


# ---- DINOv2 --------------------------------------------------------------------------------------

DINOV2_INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoV2Features(nn.Module):
    """DINOv2 class token after the final norm (what torch.hub's DINOv2 forward returns): (B, D)."""

    provides = ("cls",)

    def __init__(
        self,
        size: str = "l",
        weights: str | os.PathLike | None = None,
        *,
        cache_dir: str | None = None,
        arch_overrides: dict | None = None,
    ):
        super().__init__()
        from repa.encoders import create_encoder

        encoder = create_encoder(
            f"dinov2-{size}",
            resolution=256,  # the registry's reference: 256-px images are seen at 224 px
            weights=None if weights is None else str(weights),
            cache_dir=cache_dir,
            arch_overrides=arch_overrides,
        )
        self.vit = encoder.vit
        identity = file_sha256(weights)[:12] if weights is not None else "hub"
        self.name = f"dinov2-vit-{size}-14-{identity}"
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        _check_uint8_images(images, "the DINOv2 feature extractor")
        pixels = images.to(self.mean.device, torch.float32)
        # torch-fidelity's FeatureExtractorDinoV2 preprocessing, step for step
        pixels = interpolate_bilinear_2d_like_tensorflow1x(
            pixels, size=(DINOV2_INPUT_SIZE, DINOV2_INPUT_SIZE), align_corners=False
        )
        pixels = (pixels - self.mean) / self.std  # (B, 3, 224, 224)
        tokens = self.vit.forward_features(pixels)  # (B, 1 + T, D), final norm applied
        return {"cls": tokens[:, 0].float()}


# ---- any callable --------------------------------------------------------------------------------


class CallableFeatures:
    """Wrap `fn(uint8 images (B, 3, H, W)) -> (B, F)` as a feature space providing "features".

    `name` identifies the network (and its weights) in reference-statistics caches.
    """

    provides = ("features",)

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str):
        self.fn = fn
        self.name = name

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_uint8_images(images, f"feature space {self.name!r}")
        features = self.fn(images)
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(
                f"feature function {self.name!r} must return (B, F) features, got {tuple(features.shape)}"
            )
        return {"features": features.float()}


# ---- registry ------------------------------------------------------------------------------------

FEATURE_SPACES: dict[str, Callable[..., FeatureSpace]] = {
    "inception": InceptionFeatures,
    "dinov2": DinoV2Features,
}


def create_feature_space(name: str, **kwargs) -> FeatureSpace:
    """Build a registered feature space ("inception" or "dinov2") with its weights options."""
    if name not in FEATURE_SPACES:
        raise ValueError(f"unknown feature space {name!r}; choose one of: {', '.join(FEATURE_SPACES)}")
    return FEATURE_SPACES[name](**kwargs)
