"""A deterministic synthetic image-caption dataset: the text demo's data and the tests'.

Each image shows one shape whose four attributes are drawn independently: shape (disk, square,
triangle, cross), colour (red, green, blue, yellow), texture (plain, striped, checkered) and
position (the quadrant: top left, top right, bottom left, bottom right), on a noisy shaded
background (the class-conditional set's renderer, repa.data.synthetic). Each image gets three
captions that name all four attributes in different phrasings, so a model can follow a prompt
only by reading it (no class label carries the attributes).

Written as an image folder plus a COCO-style captions JSON, which `repa data build --captions`
reads as it reads MS-COCO, and `attributes.json` ({file name: {attribute: value}}), the ground
truth of the demo's prompt-following measure. `prompt_attributes` reads the attributes back from
any caption or prompt in this vocabulary.

Image i depends only on (seed, i, resolution): the same seed gives byte-identical files, and a
larger `num_images` extends a smaller set.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from repa.data.synthetic import _signed_distance
from repa.utils.files import write_bytes_atomic

SHAPES = ("disk", "square", "triangle", "cross")
COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
TEXTURES = ("plain", "striped", "checkered")
POSITIONS = {  # quadrant -> (column, row) centre in image units
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
}
ATTRIBUTES = ("shape", "colour", "texture", "position")
IMAGE_FOLDER, CAPTIONS_FILE, ATTRIBUTES_FILE = "images", "captions.json", "attributes.json"


def image_attributes(index: int, seed: int = 0) -> dict[str, str]:
    """The four attributes of image `index`, each drawn independently."""
    rng = np.random.default_rng([seed, index, 1])
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "texture": TEXTURES[rng.integers(len(TEXTURES))],
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
    }


def captions_for(attributes: dict[str, str]) -> list[str]:
    """Three phrasings that each name all four attributes."""
    shape, colour, texture, position = (attributes[name] for name in ATTRIBUTES)
    pattern = {"plain": "no pattern", "striped": "stripes", "checkered": "a checkered pattern"}[texture]
    return [
        f"a {texture} {colour} {shape} at the {position}",
        f"{position}: a {colour} {shape} with {pattern}",
        f"a picture of a {colour} {shape}, {texture}, in the {position} corner",
    ]


_WORDS = {
    "shape": {shape: shape for shape in SHAPES},
    "colour": {colour: colour for colour in COLOURS},
    "texture": {
        "plain": "plain",
        "no pattern": "plain",
        "striped": "striped",
        "stripes": "striped",
        "checkered": "checkered",
    },
    "position": {position: position for position in POSITIONS},
}


def prompt_attributes(prompt: str) -> dict[str, str | None]:
    """The attributes a caption or prompt names ({attribute: value or None}); a prompt naming two
    values of one attribute gives None for it (ambiguous)."""
    text = " " + re.sub(r"[^a-z]+", " ", prompt.lower()) + " "
    found: dict[str, str | None] = {}
    for attribute, words in _WORDS.items():
        values = {value for word, value in words.items() if f" {word} " in text}
        found[attribute] = values.pop() if len(values) == 1 else None
    return found


def render_captioned_image(
    index: int, *, resolution: int, seed: int = 0
) -> tuple[np.ndarray, dict[str, str]]:
    """Image `index` as uint8 (R, R, 3) and its attributes."""
    attributes = image_attributes(index, seed)
    rng = np.random.default_rng([seed, index, 2])
    coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution  # pixel centres in (0, 1)
    y, x = np.meshgrid(coords, coords, indexing="ij")  # (R, R) each
    # background: a dim random gradient plus pixel noise (grey-ish, so the colour words stay true)
    low, high = rng.uniform(0.05, 0.35, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5) + 0.71) / 1.42  # (R, R) in [0, 1]
    image = np.repeat((low + (high - low) * ramp)[..., None], 3, axis=2).astype(np.float32)
    image += rng.normal(0.0, 0.03, size=image.shape).astype(np.float32)
    # the shape in its quadrant, jittered, sized to stay inside it
    size = rng.uniform(0.17, 0.21)  # large enough that a cross's arm shows its texture at 32 px
    centre = np.asarray(POSITIONS[attributes["position"]]) + rng.uniform(-0.03, 0.03, size=2)
    rotation = rng.uniform(-0.25, 0.25)
    du, dv = (x - centre[0]) / size, (y - centre[1]) / size
    u = np.cos(rotation) * du + np.sin(rotation) * dv
    v = -np.sin(rotation) * du + np.cos(rotation) * dv
    distance = _signed_distance(attributes["shape"], u, v)
    alpha = np.clip(0.5 - distance * size * resolution, 0.0, 1.0)[..., None]  # (R, R, 1), soft edge
    period = 0.6  # in shape units: about 3.5 px at 32 px
    if attributes["texture"] == "striped":
        shade = np.where(np.sin(np.pi * (u + v) / period) > 0, 1.0, 0.45)
    elif attributes["texture"] == "checkered":
        shade = np.where((np.floor(u / period) + np.floor(v / period)) % 2 == 0, 1.0, 0.45)
    else:
        shade = np.ones_like(u)
    colour = np.asarray(COLOURS[attributes["colour"]], dtype=np.float32)
    foreground = colour * (rng.uniform(0.85, 1.05) * shade)[..., None].astype(np.float32)
    image = alpha * foreground + (1.0 - alpha) * image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), attributes


def write_captioned_dataset(
    output_dir: str | os.PathLike, *, num_images: int, resolution: int, seed: int = 0
) -> dict[str, int]:
    """Write `output_dir/images/<index>.png`, `captions.json` (COCO style) and `attributes.json`.
    Returns {"images": n, "captions": 3n}. Build shards from it with
    `repa data build OUT/images SHARDS --captions OUT/captions.json`."""
    if num_images <= 0 or resolution <= 0:
        raise ValueError(f"num_images and resolution must be positive, got {num_images}, {resolution}")
    output_dir = Path(output_dir)
    (output_dir / IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(num_images - 1)))
    images, annotations, truth = [], [], {}
    for index in range(num_images):
        pixels, attributes = render_captioned_image(index, resolution=resolution, seed=seed)
        name = f"{index:0{width}d}.png"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
        write_bytes_atomic(output_dir / IMAGE_FOLDER / name, buffer.getvalue(), durable=False)
        images.append({"id": index, "file_name": name, "width": resolution, "height": resolution})
        for caption in captions_for(attributes):
            annotations.append({"id": len(annotations), "image_id": index, "caption": caption})
        truth[name] = attributes
    table = {"images": images, "annotations": annotations}
    write_bytes_atomic(output_dir / CAPTIONS_FILE, json.dumps(table).encode())
    write_bytes_atomic(output_dir / ATTRIBUTES_FILE, json.dumps(truth, indent=0, sort_keys=True).encode())
    return {"images": len(images), "captions": len(annotations)}
