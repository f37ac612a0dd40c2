"""Per-channel latent statistics: streaming computation and REPA-E's `-latents-stats.pt` format.

File formats read: REPA-E {"latents_scale": 1/std, "latents_bias": mean} (each [1, C, 1, 1]) and
LightningDiT/VA-VAE {"mean", "std"} (any shape with C elements). Written: REPA-E's format, exactly
those two keys, float32 [1, C, 1, 1], so REPA-E's own code can read our files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from repa.tokenizers.base import LatentNorm, Tokenizer
from repa.utils.files import atomic_path


class ChannelMoments:
    """Streaming per-channel mean and variance in float64, merging batches with Chan et al.'s formula
    (no sum-of-squares cancellation when the mean is large next to the spread)."""

    def __init__(self, channels: int):
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)  # sum of squared deviations

    def update(self, z: torch.Tensor) -> None:
        """z (B, C, h, w): every position of every image is one sample of its channel."""
        values = z.detach().to("cpu", torch.float64).transpose(0, 1).reshape(z.shape[1], -1)  # (C, N)
        n = values.shape[1]
        if n == 0:
            return
        batch_mean = values.mean(dim=1)
        batch_m2 = ((values - batch_mean[:, None]) ** 2).sum(dim=1)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation (ddof=0, numpy's default)."""
        if self.count == 0:
            raise ValueError("no latents were seen: the image stream was empty")
        return (self.m2 / self.count).sqrt()


@torch.no_grad()
def compute_latent_stats(
    tokenizer: Tokenizer,
    image_batches: Iterable[torch.Tensor],
    max_images: int | None = None,
    sample_posterior: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor | int]:
    """Per-channel mean and std of the tokenizer's unnormalised latents over a stream of uint8 batches.

    sample_posterior: use z = mean + std * eps (what training sees; REPA-E's BatchNorm statistics are of
    sampled latents) rather than the posterior mean. Returns {"mean": (C,), "std": (C,) float64,
    "num_images": N}.
    """
    device = (
        torch.device(device)
        if device is not None
        else next((p.device for p in tokenizer.parameters()), torch.device("cpu"))
    )
    moments = ChannelMoments(tokenizer.latent_channels)
    num_images = 0
    for images in image_batches:
        if max_images is not None:
            images = images[: max_images - num_images]
        if len(images) == 0:
            break
        posterior = tokenizer.encode_moments(images.to(device))
        if sample_posterior:
            z = tokenizer.sample(posterior, generator=generator)
        else:
            z = posterior.chunk(2, dim=1)[0]
        moments.update(z)
        num_images += len(images)
        if max_images is not None and num_images >= max_images:
            break
    return {"mean": moments.mean, "std": moments.std, "num_images": num_images}


def save_latent_stats(path: str | os.PathLike, mean: torch.Tensor, std: torch.Tensor) -> Path:
    """Write REPA-E's stats file (latents_scale = 1/std, latents_bias = mean, [1, C, 1, 1] float32),
    atomically (a temporary file renamed into place)."""
    mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
    std = torch.as_tensor(std, dtype=torch.float64).flatten()
    if (std <= 0).any():
        raise ValueError("every channel's std must be positive to write latents_scale = 1/std")
    channels = mean.numel()
    stats = {
        "latents_scale": (1.0 / std).float().view(1, channels, 1, 1),
        "latents_bias": mean.float().view(1, channels, 1, 1),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(stats, tmp)
    return path


def load_latent_stats(path: str | os.PathLike) -> LatentNorm:
    """Read a REPA-E or LightningDiT stats file into a LatentNorm."""
    from repa.tokenizers.checkpoint import read_checkpoint

    stats = read_checkpoint(path)
    if "latents_scale" in stats and "latents_bias" in stats:
        return LatentNorm(scale=stats["latents_scale"].float(), bias=stats["latents_bias"].float())
    if "mean" in stats and "std" in stats:
        return LatentNorm.from_mean_std(stats["mean"], stats["std"])
    raise ValueError(
        f"{path} is not a latent statistics file: expected keys latents_scale/latents_bias (REPA-E) or "
        f"mean/std (LightningDiT), found {sorted(stats)}"
    )


def iter_image_folder(folder: str | os.PathLike, resolution: int, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches (B, 3, R, R) from the image files of a folder (sorted), each centre-cropped the
    ADM way to `resolution` (`repa.data.images.center_crop_adm`, as `repa data build` prepares
    training images), so the statistics are of the images the model trains on. A plain-folder
    input for `repa tokenizer stats`. (Before, the square was cut first and then resized with
    BICUBIC alone, which differs from the training images by the ADM crop's BOX halvings.)"""
    from repa.data.images import IMAGE_EXTENSIONS, list_images, load_image_batches

    files = list_images(folder)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    for batch in load_image_batches(files, batch_size, resolution):
        yield torch.from_numpy(batch)


def iter_stats_input(data: str, resolution: int, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 image batches for `repa tokenizer stats --data`: webdataset shards (anything
    `repa.data.stream.iter_eval_batches` reads: a shard folder with its manifest, a brace pattern, URLs)
    or, as a fallback, a plain folder of image files (no .tar, no manifest)."""
    path = Path(data)
    is_image_folder = path.is_dir() and not any(path.glob("*.tar")) and not (path / "manifest.json").exists()
    if is_image_folder:
        yield from iter_image_folder(path, resolution, batch_size)
        return
    from repa.data.stream import iter_eval_batches

    for batch in iter_eval_batches(data, batch_size=batch_size):
        if batch.images.shape[-1] != resolution:
            raise ValueError(
                f"shards hold {batch.images.shape[-1]}px images but --resolution is {resolution}"
            )
        yield batch.images
