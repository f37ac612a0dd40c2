"""The frozen encoder interface: uint8 images in, target tokens out.

A `FrozenEncoder` owns its preprocessing (pixels/255, normalisation, resize to the size its
patch grid needs) and always runs frozen: eval mode, no parameter requires grad, no autograd
graph. Training code aligns SiT hidden states to its output and never optimises or saves it
(its weights come from the hub or a file every time the encoder is built).

Token-grid rule shared by every encoder: an encoder is described at a reference image
resolution (256 for the pretrained ones) by the input size it sees there (224 for /14 ViTs,
256 for /16 ViTs). At image resolution R it sees `reference_input * R / reference_resolution`
pixels, which must be a whole number of patches. DINOv2-B at 256 sees 224 px = 16x16 tokens; at
512 it sees 448 px = 32x32 tokens, matching SiT-*/2 on an f8 latent at either resolution.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def encoder_input_size(
    resolution: int, *, reference_resolution: int, reference_input: int, patch_size: int, name: str
) -> int:
    """Side of the square the encoder sees for images of side `resolution`; raises if it is not a
    whole number of patches, naming the nearest resolutions that work."""

    def valid(res: int) -> bool:
        scaled = reference_input * res
        return (
            res > 0
            and scaled % reference_resolution == 0
            and (scaled // reference_resolution) % patch_size == 0
        )

    if not valid(resolution):
        lower = next((r for r in range(resolution - 1, 0, -1) if valid(r)), None)
        upper = next(r for r in range(resolution + 1, resolution + 100 * reference_resolution) if valid(r))
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"encoder '{name}' cannot encode {resolution}x{resolution} images: it resizes them to "
            f"{reference_input}/{reference_resolution} of their side and needs a whole number of "
            f"{patch_size}-pixel patches. Nearest resolutions that work: {nearest}."
        )
    return reference_input * resolution // reference_resolution


class FrozenEncoder(nn.Module):
    """Base class: frozen representation encoder, uint8 (B,3,H,W) -> float tokens (B,T,D).

    Subclasses implement `encode(pixels)` on preprocessed float pixels. Attributes known before
    any forward: `name` (registry name), `dim` (D), `resolution` (the image side it was built
    for), `input_size` (the side it resizes images to), `token_grid(res)` and `num_tokens(res)`.
    """

    name: str
    dim: int

    def __init__(
        self,
        *,
        name: str,
        dim: int,
        resolution: int,
        reference_resolution: int,
        reference_input: int,
        patch_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        resize_first: bool = False,
    ):
        super().__init__()
        self.name = name
        self.dim = dim
        self.reference_resolution = reference_resolution
        self.reference_input = reference_input
        self.patch_size = patch_size
        # CLIP's reference resizes then normalises, DINOv2's normalises then resizes. Bicubic
        # weights sum to one, so both orders are the same linear map up to float rounding; we
        # keep each reference's order anyway.
        self.resize_first = resize_first
        self.resolution = resolution
        self.input_size = self._input_size(resolution)
        # Non-persistent: the encoder's state_dict holds only the network's weights.
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # ---- geometry (no forward needed) -------------------------------------------------------
    def _input_size(self, resolution: int) -> int:
        return encoder_input_size(
            resolution,
            reference_resolution=self.reference_resolution,
            reference_input=self.reference_input,
            patch_size=self.patch_size,
            name=self.name,
        )

    def token_grid(self, resolution: int) -> tuple[int, int]:
        """(rows, cols) of the tokens returned for square images of side `resolution`."""
        side = self._input_size(resolution) // self.patch_size
        return side, side

    def num_tokens(self, resolution: int) -> int:
        """Number of tokens T returned for square images of side `resolution`."""
        rows, cols = self.token_grid(resolution)
        return rows * cols

    # ---- frozen-ness --------------------------------------------------------------------------
    def freeze(self) -> FrozenEncoder:
        """Put the encoder in eval mode and stop gradients to every parameter."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Always stays in eval mode: a training loop's `model.train()` must not switch on
        dropout or batch-norm updates in the target network."""
        return super().train(False)

    # ---- forward ------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,R,R) -> normalised float32 (B,3,S,S), S = `input_size` (bicubic, no antialias)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"encoder '{self.name}' takes uint8 images in [0, 255], got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"encoder '{self.name}' takes images shaped (B, 3, H, W), got {tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        if height != self.resolution or width != self.resolution:
            raise ValueError(
                f"encoder '{self.name}' was built for {self.resolution}x{self.resolution} images, got "
                f"{height}x{width}; create it with resolution={height}"
            )
        pixels = images.float() / 255.0
        if self.resize_first:
            pixels = self._resize(pixels)
            return (pixels - self.mean) / self.std
        return self._resize((pixels - self.mean) / self.std)

    def _resize(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] == self.input_size:
            return pixels
        # REPA: F.interpolate(x, 224 * (res // 256), mode="bicubic"), i.e. no antialias.
        return F.interpolate(
            pixels, size=self.input_size, mode="bicubic", align_corners=False, antialias=False
        )

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B,3,S,S) -> tokens (B,T,D). Implemented by subclasses."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B,3,R,R) -> target tokens (B,T,D), without building an autograd graph.
        Runs under the caller's autocast (matmuls in its dtype; a final LayerNorm, an fp32 op
        under autocast, returns float32)."""
        with torch.no_grad():
            return self.encode(self.preprocess(images))

    # ---- the class token (REG) ------------------------------------------------------------------
    @property
    def has_class_token(self) -> bool:
        """Whether `forward_with_class_token` works (REG needs it); subclasses that have one say so."""
        return False

    def encode_with_class_token(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed pixels -> (tokens (B,T,D), class token (B,D)). Implemented by subclasses."""
        raise ValueError(
            f"encoder '{self.name}' has no class token, which --method reg needs: choose an encoder "
            "with one (e.g. dinov2-b)"
        )

    def forward_with_class_token(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (B,3,R,R) -> (tokens (B,T,D), class token (B,D)), as `forward` (same
        tokens), plus the class token through the same final norm (DINOv2's x_norm_clstoken)."""
        with torch.no_grad():
            return self.encode_with_class_token(self.preprocess(images))

    def extra_repr(self) -> str:
        rows, cols = self.token_grid(self.resolution)
        return (
            f"name={self.name!r}, dim={self.dim}, resolution={self.resolution}, "
            f"input_size={self.input_size}, tokens={rows}x{cols}"
        )


class ViTEncoder(FrozenEncoder):
    """A timm VisionTransformer as a frozen encoder: returns the last block's patch tokens
    (class and register tokens dropped), through the final norm when `final_norm`."""

    def __init__(self, vit: nn.Module, *, final_norm: bool, **kwargs):
        super().__init__(dim=vit.embed_dim, **kwargs)
        grid = tuple(vit.patch_embed.grid_size)
        if grid != self.token_grid(self.resolution):
            raise ValueError(
                f"encoder '{self.name}': the network was built for a {grid} token grid, but resolution "
                f"{self.resolution} needs {self.token_grid(self.resolution)}"
            )
        self.vit = vit
        self.final_norm = final_norm
        self.freeze()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # (B,3,S,S) -> (B, prefix + T, D) through every block -> (B,T,D) with prefix tokens dropped
        (tokens,) = self.vit.forward_intermediates(
            pixels, indices=1, norm=self.final_norm, output_fmt="NLC", intermediates_only=True
        )
        return tokens

    @property
    def has_class_token(self) -> bool:
        return getattr(self.vit, "cls_token", None) is not None

    def encode_with_class_token(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_class_token:
            return super().encode_with_class_token(pixels)
        # prefix tokens (B, 1 + registers, D): the class token first (timm), then any registers
        ((tokens, prefix),) = self.vit.forward_intermediates(
            pixels,
            indices=1,
            norm=self.final_norm,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
        return tokens, prefix[:, 0]


class ClassTokenFirst(nn.Module):
    """An encoder whose tokens are [class token; patch tokens] (B, 1 + T, D): what `repa data build
    --cache-features NAME --with-class-token` stores for REG. Same name and width as the encoder."""

    class_token_first = True

    def __init__(self, encoder: FrozenEncoder):
        super().__init__()
        if not encoder.has_class_token:
            raise ValueError(f"encoder '{encoder.name}' has no class token for --with-class-token")
        self.encoder = encoder
        self.name, self.dim = encoder.name, encoder.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, class_token = self.encoder.forward_with_class_token(images)
        return torch.cat([class_token.unsqueeze(1), tokens], dim=1)


def check_token_grid(
    encoder: FrozenEncoder,
    resolution: int,
    model_grid: tuple[int, int],
    *,
    model_patch_size: int | None = None,
) -> None:
    """Raise if the encoder's token grid at `resolution` differs from the diffusion model's.

    `model_grid` is the (rows, cols) of the model's tokens; `model_patch_size` (if given) is used
    to say which patch size would match."""
    enc_grid = encoder.token_grid(resolution)
    if tuple(model_grid) == enc_grid:
        return
    hint = ""
    if model_patch_size is not None and (model_grid[0] * model_patch_size) % enc_grid[0] == 0:
        hint = f" A model patch size of {model_grid[0] * model_patch_size // enc_grid[0]} would match."
    raise ValueError(
        f"token mismatch at resolution {resolution}: encoder '{encoder.name}' gives "
        f"{enc_grid[0]}x{enc_grid[1]} tokens but the model gives {model_grid[0]}x{model_grid[1]}.{hint}"
    )
