"""A deterministic, class-conditional synthetic image dataset for the demo and the tests.

Each class has its own (shape, hue, texture) triple, so classes are visually distinct; each image
varies the position, size, brightness and orientation of the texture, and draws a noisy, smoothly
shaded background, so a model has something to learn beyond a class lookup table.
The images are written in the ImageNet training layout (one folder per class) so that
`repa data build` consumes them exactly as it consumes real data.

Image `i` depends only on (seed, i, resolution, num_classes): the same seed gives byte-identical
files, and a larger `num_images` extends a smaller set instead of reshuffling it.
"""

from __future__ import annotations

import colorsys
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from repa.utils.files import write_bytes_atomic

SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond", "bar", "ellipse")
TEXTURES = ("solid", "stripes", "checker")
GOLDEN_RATIO_CONJUGATE = 0.6180339887498949  # successive hues spread evenly round the circle


def class_name(class_index: int, num_classes: int) -> str:
    """Folder name of a class, e.g. `class03_ring_solid` (zero-padded so sorting keeps class order)."""
    width = max(2, len(str(num_classes - 1)))
    shape = SHAPES[class_index % len(SHAPES)]
    texture = TEXTURES[class_index % len(TEXTURES)]
    return f"class{class_index:0{width}d}_{shape}_{texture}"


def class_colour(class_index: int) -> np.ndarray:
    """Saturated RGB colour in [0, 1] of a class (hues spaced by the golden ratio)."""
    hue = (class_index * GOLDEN_RATIO_CONJUGATE) % 1.0
    value = 0.95 if class_index % 2 == 0 else 0.75  # alternate brightness: neighbours in hue differ
    return np.array(colorsys.hsv_to_rgb(hue, 0.85, value), dtype=np.float32)


def _signed_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) of a unit-size shape in local coords (u, v)."""
    if shape == "disk":
        return np.sqrt(u**2 + v**2) - 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.85
    if shape == "triangle":  # upward triangle: max of three half-plane distances
        return np.maximum.reduce([v * 1.0 - 0.6, -0.866 * u - 0.5 * v - 0.6, 0.866 * u - 0.5 * v - 0.6])
    if shape == "ring":
        return np.abs(np.sqrt(u**2 + v**2) - 0.75) - 0.25
    if shape == "cross":
        arm_h = np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.3)
        arm_v = np.maximum(np.abs(u) - 0.3, np.abs(v) - 1.0)
        return np.minimum(arm_h, arm_v)
    if shape == "diamond":
        return (np.abs(u) + np.abs(v)) / 1.4142 - 0.75
    if shape == "bar":
        return np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.35)
    if shape == "ellipse":
        return np.sqrt((u / 1.0) ** 2 + (v / 0.55) ** 2) - 1.0
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def render_image(
    index: int, *, resolution: int, num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Render image `index`; returns (uint8 (R, R, 3) array, class index).

    Labels cycle through the classes (index % num_classes), so every prefix of the dataset is
    class-balanced.
    """
    label = index % num_classes
    rng = np.random.default_rng([seed, index])
    coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution  # pixel centres in (0, 1)
    y, x = np.meshgrid(coords, coords, indexing="ij")  # (R, R) each

    # Background: a dim random colour gradient plus pixel noise.
    corner_a, corner_b = rng.uniform(0.05, 0.45, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5) + 0.71) / 1.42  # (R, R) in [0, 1]
    image = corner_a + (corner_b - corner_a) * ramp[..., None]  # (R, R, 3)
    image = image + rng.normal(0.0, 0.04, size=image.shape).astype(np.float32)

    # Foreground: the class shape at a random position, size and rotation.
    size = rng.uniform(0.22, 0.36)
    centre = rng.uniform(0.5 - (0.45 - size), 0.5 + (0.45 - size), size=2)
    rotation = rng.uniform(-0.3, 0.3)
    du, dv = (x - centre[0]) / size, (y - centre[1]) / size
    u = np.cos(rotation) * du + np.sin(rotation) * dv
    v = -np.sin(rotation) * du + np.cos(rotation) * dv
    distance = _signed_distance(SHAPES[label % len(SHAPES)], u, v)
    # Anti-aliased coverage: one pixel of soft edge in image units.
    alpha = np.clip(0.5 - distance * size * resolution, 0.0, 1.0)[..., None]  # (R, R, 1)

    texture = TEXTURES[label % len(TEXTURES)]
    period = rng.uniform(0.25, 0.4)  # in shape units
    if texture == "stripes":
        shade = np.where(np.sin(np.pi * (u + v) / period) > 0, 1.0, 0.55)
    elif texture == "checker":
        shade = np.where((np.floor(u / period) + np.floor(v / period)) % 2 == 0, 1.0, 0.55)
    else:
        shade = np.ones_like(u)
    brightness = rng.uniform(0.8, 1.1)
    foreground = class_colour(label) * (brightness * shade)[..., None].astype(np.float32)
    image = alpha * foreground + (1.0 - alpha) * image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), label


def write_synthetic_dataset(
    output_dir: str | os.PathLike,
    *,
    num_images: int,
    resolution: int,
    num_classes: int = 10,
    seed: int = 0,
) -> dict[str, int]:
    """Write `num_images` PNGs to `output_dir/<class name>/<index>.png`; returns counts per class.

    Files are written under a temporary name and renamed, so an interrupted run leaves no
    truncated PNG; rerunning rewrites identical bytes.
    """
    if num_images <= 0 or resolution <= 0 or num_classes <= 0:
        raise ValueError(
            f"num_images, resolution and num_classes must be positive, got {num_images}, "
            f"{resolution}, {num_classes}"
        )
    output_dir = Path(output_dir)
    names = [class_name(c, num_classes) for c in range(num_classes)]
    for name in names:
        (output_dir / name).mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(names, 0)
    width = max(6, len(str(num_images - 1)))
    for index in range(num_images):
        pixels, label = render_image(index, resolution=resolution, num_classes=num_classes, seed=seed)
        buffer = io.BytesIO()
        # compress_level fixed so the bytes do not depend on Pillow's default.
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
        path = output_dir / names[label] / f"{index:0{width}d}.png"
        write_bytes_atomic(path, buffer.getvalue(), durable=False)  # regenerable: no fsync per image
        counts[names[label]] += 1
    return counts
