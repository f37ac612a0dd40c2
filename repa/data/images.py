"""Folders of image files: the one extension list, the folder walk, ADM's centre crop, batches.

Every reader of image folders uses this module: shard building (repa.data.build, ImageNet
class folders), reference image sets for metrics (repa.eval.references) and latent statistics
(repa.tokenizers.stats). Images prepared for training or statistics are cropped the ADM way
(`center_crop_adm`); a reference folder is read as it is (its images must share one size, as
the ADM reference batch's do). numpy and Pillow only: no torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".gif")


def is_image_file(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, sorted."""
    return sorted(
        Path(dirpath, name)
        for dirpath, _, filenames in os.walk(folder)
        for name in filenames
        if is_image_file(name)
    )


def list_class_folders(root: str | os.PathLike) -> tuple[list[tuple[Path, int]], list[str]]:
    """ImageNet training layout `root/<class>/<image>` -> ((image, class index) in class order,
    class names); classes are indexed in sorted folder order, a folder without images included."""
    root = Path(root)
    class_names = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not class_names:
        raise ValueError(f"{root}: no class sub-folders (expected the ImageNet layout root/<class>/<image>)")
    images = [(path, label) for label, name in enumerate(class_names) for path in list_images(root / name)]
    return images, class_names


def center_crop_adm(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion `center_crop_arr`, the spec's "center-crop-dhariwal").

    While the short side is at least twice `resolution`, halve both sides (floor) with a BOX
    filter; then resize with BICUBIC so the short side equals `resolution` (the other side
    rounded); then cut the centred `resolution` square (offset floor((size - resolution) / 2)).
    Returns uint8 (resolution, resolution, 3).
    """
    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)  # (H, W, 3)
    top = (pixels.shape[0] - resolution) // 2
    left = (pixels.shape[1] - resolution) // 2
    return np.ascontiguousarray(pixels[top : top + resolution, left : left + resolution])


def load_image(path: str | os.PathLike, resolution: int | None = None) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of an image file; ADM-cropped to `resolution` when given."""
    with Image.open(path) as image:
        if resolution is not None:
            return center_crop_adm(image, resolution)
        return np.asarray(image.convert("RGB"))


def load_image_batches(
    files: Sequence[str | os.PathLike], batch_size: int, resolution: int | None = None
) -> Iterator[np.ndarray]:
    """uint8 (B, 3, H, W) batches of `files` in order (see `load_image`). Without `resolution`
    every image must have the first one's size."""
    size = None
    for start in range(0, len(files), batch_size):
        images = []
        for file in files[start : start + batch_size]:
            pixels = load_image(file, resolution)
            if size is None:
                size = pixels.shape
            elif pixels.shape != size:
                raise ValueError(
                    f"{file} is {pixels.shape[1]}x{pixels.shape[0]} but earlier images are "
                    f"{size[1]}x{size[0]}; resize the images to one size first "
                    "(e.g. `repa data build --resolution R`)"
                )
            images.append(pixels)
        yield np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))
