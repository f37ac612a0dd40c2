"""`repa data build`: turn an image collection into resolution-fixed webdataset shards, once.

Sources: an ImageNet-layout folder (one sub-folder per class), a flat folder plus a labels file
(CSV or JSON, filename -> class), an image folder plus a COCO-style captions JSON, or existing
webdataset tar shards (jpg/png/webp with cls or json labels, or txt/json captions, as img2dataset
writes them). Every image is centre-cropped the ADM way (`center_crop_adm`, repa.data.images)
and stored losslessly (PNG) with its class index and source key, optionally with cached VAE
moments (of the image and of its mirror image) and encoder target tokens.

Captioned sources keep every caption of an image (`captions.json`, a JSON list); the training
stream draws one per sample. With a text encoder, each caption's token embeddings (fp16) and
attention mask are cached too (`text.npy` (K, L, D), `text_mask.npy` (K, L) for K captions), and
the embedding of the empty caption (the null caption for classifier-free guidance) is written
once beside the manifest (`null_text.npy`, `null_text_mask.npy`).

Guarantees:
- Deterministic: samples are sorted by source key, permuted with a fixed seed (so every shard
  mixes all classes) and cut into shards of `shard_size`; the tar bytes carry no timestamps, so
  rebuilding gives the same sha256 per shard.
- Atomic: a shard is written under a temporary name and renamed only once complete, and its
  sidecar (`PREFIX-000000.json`: count, sha256, fingerprint of keys and options) is written after
  it, so an interrupted build never leaves a half-written shard under its final name.
- Resumable: rerunning skips every shard whose sidecar fingerprint matches and whose file's
  sha256 equals the sidecar's; everything else is rebuilt.
- Distributed: with RANK/WORLD_SIZE set (torchrun, `accelerate launch`), process r builds the
  shards i with i % world_size == r; the main process writes the manifest once all sidecars exist.

The data package knows shards, not models: caching takes duck-typed objects,
`tokenizer.encode_moments(uint8 (B,3,H,W)) -> (B,2C,h,w)`, `encoder(uint8 (B,3,H,W)) -> (B,T,D)`
and `text_encoder.encode(list of N str) -> (float (N,L,D), bool (N,L))` (repa.text).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from repa.data import shards as fmt
from repa.data.images import IMAGE_EXTENSIONS, center_crop_adm, list_class_folders  # noqa: F401 (re-exported)
from repa.utils.files import atomic_path, file_sha256, stale_temporaries, write_bytes_atomic

TAR_IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceItem:
    """One input image: where its bytes are, which class it belongs to, its captions."""

    key: str  # unique source key; shards are cut from the items sorted by it
    label: int
    path: str  # image file, or the tar shard holding it
    offset: int = -1  # for images inside a tar: byte offset and size of the member's data
    size: int = -1
    captions: tuple[str, ...] = ()  # every caption of the image, in source order; () = none


def read_item_bytes(item: SourceItem) -> bytes:
    with open(item.path, "rb") as handle:
        if item.offset < 0:
            return handle.read()
        handle.seek(item.offset)
        data = handle.read(item.size)
    if len(data) != item.size:
        raise OSError(f"{item.path}: truncated member {item.key}")
    return data


def _label_indices(raw_labels: Sequence[str | int]) -> tuple[list[int], list[str]]:
    """Map raw labels to indices: integers stay themselves, names are indexed in sorted order."""
    as_text = [str(label).strip() for label in raw_labels]
    if all(text.lstrip("-").isdigit() for text in as_text):
        indices = [int(text) for text in as_text]
        if min(indices, default=0) < 0:
            raise ValueError("class indices must be >= 0")
        return indices, [str(i) for i in range(max(indices, default=-1) + 1)]
    names = sorted(set(as_text))
    lookup = {name: i for i, name in enumerate(names)}
    return [lookup[text] for text in as_text], names


def list_image_folder(root: str | os.PathLike) -> tuple[list[SourceItem], list[str]]:
    """ImageNet training layout: `root/<class>/<image>`; classes indexed in sorted folder order."""
    images, class_names = list_class_folders(root)
    items = [SourceItem(path.relative_to(root).as_posix(), label, str(path)) for path, label in images]
    return items, class_names


def _read_labels_file(labels_file: str | os.PathLike) -> dict[str, str]:
    labels_file = str(labels_file)
    if labels_file.endswith(".json"):
        with open(labels_file) as handle:
            table = json.load(handle)
        if not isinstance(table, dict):
            raise ValueError(f"{labels_file}: expected a JSON object {{filename: class}}")
        return {str(name): str(label) for name, label in table.items()}
    table = {}
    with open(labels_file, newline="") as handle:
        for row_number, row in enumerate(csv.reader(handle)):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 2:
                raise ValueError(f"{labels_file}:{row_number + 1}: expected `filename,class`, got {row}")
            if row_number == 0 and row[1].strip().lower() in ("class", "label", "cls", "class_index"):
                continue  # header row
            table[row[0].strip()] = row[1].strip()
    return table


def list_labelled_folder(
    root: str | os.PathLike, labels_file: str | os.PathLike
) -> tuple[list[SourceItem], list[str]]:
    """A folder of images plus a CSV/JSON labels file mapping file names (relative to root) to classes."""
    table = _read_labels_file(labels_file)
    if not table:
        raise ValueError(f"{labels_file}: no labels")
    missing = [name for name in table if not os.path.isfile(os.path.join(root, name))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} labelled files missing under {root}, e.g. {missing[:3]}")
    names = sorted(table)
    indices, class_names = _label_indices([table[name] for name in names])
    items = [SourceItem(name, label, os.path.join(root, name)) for name, label in zip(names, indices)]
    return items, class_names


def list_coco_captions(
    root: str | os.PathLike, captions_file: str | os.PathLike
) -> tuple[list[SourceItem], list[str]]:
    """An image folder plus a COCO-style captions JSON (`captions_train2014.json`):
    {"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption", "id"}, ...]}.

    Every image the JSON lists must exist under `root` and have at least one caption; its
    captions are kept in annotation-id order. There are no classes: every label is 0.
    """
    with open(captions_file) as handle:
        table = json.load(handle)
    if not isinstance(table, dict) or "images" not in table or "annotations" not in table:
        raise ValueError(f"{captions_file}: expected a COCO captions JSON with 'images' and 'annotations'")
    files = {image["id"]: str(image["file_name"]) for image in table["images"]}
    captions: dict[Any, list[tuple[Any, str]]] = {image_id: [] for image_id in files}
    for position, note in enumerate(table["annotations"]):
        if note.get("image_id") not in files:
            raise ValueError(
                f"{captions_file}: annotation {note.get('id')} names unknown image {note.get('image_id')}"
            )
        captions[note["image_id"]].append((note.get("id", position), str(note["caption"]).strip()))
    uncaptioned = [files[i] for i, found in captions.items() if not found]
    if uncaptioned:
        raise ValueError(
            f"{captions_file}: {len(uncaptioned)} images without a caption, e.g. {uncaptioned[:3]}"
        )
    missing = [name for name in files.values() if not os.path.isfile(os.path.join(root, name))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} captioned images missing under {root}, e.g. {missing[:3]}")
    items = [
        SourceItem(name, 0, os.path.join(root, name), captions=tuple(text for _, text in sorted(captions[i])))
        for i, name in files.items()
    ]
    return items, ["0"]


def _json_label(record: Any) -> str | None:
    for field_name in ("cls", "label", "class", "class_index"):
        if isinstance(record, dict) and record.get(field_name) is not None:
            return str(record[field_name])
    return None


def _json_captions(record: Any) -> dict[str, list[str]]:
    """img2dataset's json: a "caption" string; other tools write a "captions" list."""
    if not isinstance(record, dict):
        return {}
    listed, single = record.get("captions"), record.get("caption")
    found = {}
    if isinstance(listed, list):
        found["json_list"] = [str(text).strip() for text in listed if str(text).strip()]
    if isinstance(single, str) and single.strip():
        found["json_caption"] = [single.strip()]
    return found


def list_tar_shards(shards: str | Sequence[str]) -> tuple[list[SourceItem], list[str]]:
    """Existing local webdataset shards (img2dataset style): an image member plus `cls` or `json`
    labels, and/or captions.

    Captions come from repa's `captions.json` (a list), else a json member's "captions" list,
    else the `txt` member (one caption per line), else a json member's "caption". Captioned
    shards may lack classes altogether (every label is then 0); otherwise every image needs a
    class, and if any image has a caption every image needs one.
    Only the headers are read here (members are located by byte offset and read later), apart from
    the small cls/json/txt members. Captions are kept when every image has one; otherwise the
    source is read as class-labelled and they are dropped.
    """
    urls = fmt.expand_shard_urls(shards)
    items_raw: list[tuple[str, str, int, int, tuple[str, ...]]] = []
    raw_labels: list[str | None] = []
    for url in urls:
        if fmt.is_remote(url):
            raise ValueError(f"{url}: building from remote shards is not supported; copy them locally first")
        images: dict[str, tuple[int, int]] = {}
        labels: dict[str, str] = {}
        # key -> captions by source, in the order of preference
        captions: dict[str, dict[str, list[str]]] = {}
        with tarfile.open(url, "r:") as archive:
            for member in archive:
                if not member.isreg() or "." not in os.path.basename(member.name):
                    continue
                directory, basename = os.path.split(member.name)
                stem, suffix = basename.split(".", 1)
                key = f"{directory}/{stem}" if directory else stem
                suffix = suffix.lower()
                if suffix in TAR_IMAGE_SUFFIXES and key not in images:
                    images[key] = (member.offset_data, member.size)
                elif suffix == "cls":
                    labels[key] = archive.extractfile(member).read().decode().strip()
                elif suffix == "json":
                    record = json.loads(archive.extractfile(member).read())
                    label = _json_label(record)
                    if label is not None and key not in labels:
                        labels[key] = label
                    captions.setdefault(key, {}).update(_json_captions(record))
                elif suffix == "txt":
                    lines = archive.extractfile(member).read().decode().splitlines()
                    captions.setdefault(key, {})["txt"] = [line.strip() for line in lines if line.strip()]
                elif suffix == fmt.CAPTIONS:
                    listed = json.loads(archive.extractfile(member).read())
                    captions.setdefault(key, {})["repa"] = [str(text) for text in listed]
        shard_base = os.path.basename(url)
        for key, (offset, size) in images.items():
            found = captions.get(key, {})
            preference = ("repa", "json_list", "txt", "json_caption")
            chosen = next((found[k] for k in preference if found.get(k)), [])
            items_raw.append((f"{shard_base}/{key}", url, offset, size, tuple(chosen)))
            raw_labels.append(labels.get(key))
    captioned = all(raw[4] for raw in items_raw)
    if captioned and all(label is None for label in raw_labels):
        raw_labels = ["0"] * len(raw_labels)  # captions, no classes
    elif not captioned:  # a class-labelled source: captions of only some images are dropped
        items_raw = [(*raw[:4], ()) for raw in items_raw]
    unlabelled = [raw[0] for raw, label in zip(items_raw, raw_labels) if label is None]
    if unlabelled:
        raise ValueError(
            f"sample {unlabelled[0]} has an image but no class (.cls, or json 'label'/'cls') "
            f"and no caption ({len(unlabelled)} such)"
        )
    indices, class_names = _label_indices(raw_labels)
    # Keep class names from a repa manifest beside the input shards when there is one.
    manifest_path = fmt.locate_manifest(urls[0]) if urls else None
    if manifest_path and os.path.exists(manifest_path):
        class_names = fmt.read_manifest(manifest_path)["class_names"]
    items = [
        SourceItem(key, label, path, offset, size, texts)
        for (key, path, offset, size, texts), label in zip(items_raw, indices)
    ]
    return items, class_names


def list_source(
    source: str,
    labels_file: str | None = None,
    shuffle_seed: int | None = 0,
    captions_file: str | None = None,
) -> tuple[list[SourceItem], list[str]]:
    """Dispatch on the source kind; returns the items in shard order and the class names.

    The order is the items sorted by source key, then permuted with `shuffle_seed`: deterministic
    (the same keys give the same shards), yet every shard mixes all classes, which a streaming
    reader's shuffle buffer (spanning a shard or two) cannot do for class-sorted shards.
    `shuffle_seed=None` keeps the sorted order. `captions_file`: a COCO-style captions JSON for
    the image folder `source`.
    """
    if labels_file is not None and captions_file is not None:
        raise ValueError("--labels and --captions are two kinds of source: give one")
    if captions_file is not None:
        items, class_names = list_coco_captions(source, captions_file)
    elif labels_file is not None:
        items, class_names = list_labelled_folder(source, labels_file)
    elif os.path.isdir(source) and not any(name.endswith(".tar") for name in os.listdir(source)):
        items, class_names = list_image_folder(source)
    elif os.path.isdir(source) and not os.path.exists(os.path.join(source, fmt.MANIFEST_NAME)):
        # A folder of tar shards without a manifest (e.g. img2dataset output): all of them, sorted.
        items, class_names = list_tar_shards(sorted(str(p) for p in Path(source).glob("*.tar")))
    else:
        items, class_names = list_tar_shards(source)
    if not items:
        raise ValueError(f"{source}: no images found")
    items.sort(key=lambda item: item.key)
    duplicates = [a.key for a, b in zip(items, items[1:]) if a.key == b.key]
    if duplicates:
        raise ValueError(f"{source}: duplicate source keys, e.g. {duplicates[:3]}")
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(items))
        items = [items[i] for i in order]
    return items, class_names


# ----------------------------------------------------------------------------- building


@dataclass
class BuildResult:
    manifest_path: str | None  # None on non-main processes
    pattern: str  # brace-expandable shard pattern, relative to the output folder
    num_samples: int
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)


def _prepare_image(job: tuple[SourceItem, int, bool]) -> tuple[bytes, np.ndarray | None]:
    """Worker: read, crop and PNG-encode one image. Returns (png bytes, uint8 (R, R, 3) or None)."""
    item, resolution, return_pixels = job
    with Image.open(io.BytesIO(read_item_bytes(item))) as image:
        pixels = center_crop_adm(image, resolution)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue(), (pixels if return_pixels else None)


class _HashingWriter:
    """File wrapper that hashes what it writes (tar stream mode only calls write)."""

    def __init__(self, handle: io.BufferedWriter):
        self.handle, self.sha256, self.size = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime, uid, gid 0: identical bytes on every rebuild
    info.size, info.mode = len(data), 0o644
    archive.addfile(info, io.BytesIO(data))


def _process_index() -> tuple[int, int, Any]:
    """(rank, world size, accelerate state or None) of this process in a multi-process build.

    RANK/WORLD_SIZE (set by torchrun and `accelerate launch`) decide; accelerate's PartialState
    is used for its barrier only when it agrees (on CPU it may not initialise a process group).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, None
    rank = int(os.environ.get("RANK", "0"))
    try:
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes == world_size and state.process_index == rank:
            return rank, world_size, state
    except ImportError:
        pass
    return rank, world_size, None


def _model_device(model: Any) -> Any:
    import torch

    if isinstance(getattr(model, "device", None), torch.device):
        return model.device
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


def _run_batched(model: Any, fn: Any, images: np.ndarray, batch_size: int, dtype: Any) -> np.ndarray:
    """Apply `fn` (a method of `model`) to uint8 (N, R, R, 3) images in batches; numpy `dtype` out."""
    import torch

    device = _model_device(model)
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)  # (B,3,R,R)
            outputs.append(fn(batch.contiguous().to(device)).float().cpu().numpy().astype(dtype))
    return np.concatenate(outputs)


def encode_captions(
    text_encoder: Any, captions: Sequence[str], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """captions (N) -> token embeddings float16 (N, L, D) and attention mask bool (N, L)."""
    embeddings, masks = [], []
    for start in range(0, len(captions), batch_size):
        batch_embeddings, batch_mask = text_encoder.encode(list(captions[start : start + batch_size]))
        embeddings.append(np.asarray(batch_embeddings.float().cpu().numpy(), dtype=np.float16))
        masks.append(np.asarray(batch_mask.cpu().numpy(), dtype=bool))
    return np.concatenate(embeddings), np.concatenate(masks)


def _write_null_text(output_dir: Path, text_encoder: Any) -> None:
    """The empty caption's embedding and mask: the null caption of classifier-free guidance
    (REPA's choice, its `empty_context.npy`), so training never runs the text encoder."""
    embeddings, mask = encode_captions(text_encoder, [""], 1)
    write_bytes_atomic(output_dir / fmt.NULL_TEXT, fmt.npy_bytes(embeddings[0]))  # (L, D) float16
    write_bytes_atomic(output_dir / fmt.NULL_TEXT_MASK, fmt.npy_bytes(mask[0]))  # (L,) bool


def _model_name(model: Any) -> str | None:
    return None if model is None else str(getattr(model, "name", type(model).__name__))


def build_shards(
    source: str,
    output_dir: str | os.PathLike,
    *,
    resolution: int,
    shard_size: int = 1000,
    workers: int = 4,
    labels_file: str | None = None,
    prefix: str = "train",
    tokenizer: Any = None,
    encoder: Any = None,
    latent_dtype: str = "float32",
    cache_flipped_features: bool = False,
    encode_batch_size: int = 64,
    shuffle_seed: int | None = 0,
    wait_timeout_s: float = 24 * 3600.0,
    on_estimate: Callable[..., None] | None = None,
    ignore_disk_space: bool = False,
    captions_file: str | None = None,
    text_encoder: Any = None,
) -> BuildResult:
    """Build (or resume building) shards of `source` in `output_dir`; see the module docstring.

    `tokenizer` (with `encode_moments`) adds `latent.npy` and `latent_flip.npy`; `encoder`
    (callable) adds `features.npy` (fp16), and `features_flip.npy` with `cache_flipped_features`.
    `captions_file`: a COCO-style captions JSON for the image folder `source` (captioned tar
    shards carry their own). `text_encoder` (with `encode`, repa.text) adds `text.npy` and
    `text_mask.npy` per image and the null caption's beside the manifest.
    `workers` processes read, crop and PNG-encode images (0 or 1: in this process).
    Before anything is written, the output's size is estimated per component and given to
    `on_estimate(estimate, free bytes)` on the main process; a build whose missing shards would not
    fit in the free space raises InsufficientDiskSpaceError unless `ignore_disk_space`
    (repa.data.estimate).
    """
    if resolution <= 0 or shard_size <= 0 or encode_batch_size <= 0:
        raise ValueError(
            "resolution, shard_size and encode_batch_size must be positive, got "
            f"{resolution}, {shard_size}, {encode_batch_size}"
        )
    if workers < 0:
        raise ValueError(f"workers must be 0 (this process) or more, got {workers}")
    if latent_dtype not in ("float16", "float32"):
        raise ValueError(f"latent_dtype must be float16 or float32, got {latent_dtype!r}")
    if tokenizer is not None and not callable(getattr(tokenizer, "encode_moments", None)):
        raise TypeError("tokenizer must have encode_moments(uint8 (B,3,H,W)) -> (B,2C,h,w)")
    if encoder is not None and not callable(encoder):
        raise TypeError("encoder must be callable: encoder(uint8 (B,3,H,W)) -> (B,T,D)")
    if text_encoder is not None and not callable(getattr(text_encoder, "encode", None)):
        raise TypeError("text_encoder must have encode(list of N str) -> ((N,L,D), (N,L) mask)")
    # a bad source creates nothing
    items, class_names = list_source(source, labels_file, shuffle_seed, captions_file)
    captioned = bool(items[0].captions)
    if text_encoder is not None and not captioned:
        raise ValueError(
            f"{source}: --cache-text needs captions (--captions FILE.json for an image folder, or "
            "tar shards with a txt/json caption for every image), and this source has none"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    num_shards = (len(items) + shard_size - 1) // shard_size
    rank, world_size, state = _process_index()
    options = {
        "source": str(source),
        "labels_file": labels_file,
        "resolution": resolution,
        "shard_size": shard_size,
        "shuffle_seed": shuffle_seed,
        "prefix": prefix,
        "crop": "center-crop-dhariwal",
        "cache_latents": _model_name(tokenizer),
        "latent_dtype": latent_dtype if tokenizer is not None else None,
        "cache_features": _model_name(encoder),
        "cache_flipped_features": bool(encoder is not None and cache_flipped_features),
    }
    if getattr(encoder, "class_token_first", False):  # REG: features are [class token; patches]
        options["cache_class_token"] = True  # only then, as captions: other fingerprints stay
    if captioned:  # only then: fingerprints of uncaptioned builds stay as they were
        options.update(captions_file=captions_file, captions=True, cache_text=_model_name(text_encoder))
        if text_encoder is not None:
            options["text_max_length"] = int(text_encoder.max_length)
    # What a shard's bytes depend on (not the worker count or the source path).
    content_options = {
        k: v for k, v in options.items() if k not in ("source", "labels_file", "captions_file")
    }

    result = BuildResult(None, fmt.brace_pattern(prefix, num_shards), len(items))
    pending: list[tuple[int, list[SourceItem], str]] = []
    for index in range(rank, num_shards, world_size):
        shard_items = items[index * shard_size : (index + 1) * shard_size]
        described = [(it.key, it.label, *([list(it.captions)] if captioned else [])) for it in shard_items]
        fingerprint = hashlib.sha256(json.dumps([content_options, described]).encode()).hexdigest()
        name = fmt.shard_name(prefix, index)
        # Left by an interrupted run of this rank; `NAME.tmp-PID` is what builds wrote before
        # the shared atomic-write helper, whose names are hidden.
        stale = [*stale_temporaries(output_dir / name), *stale_temporaries(_sidecar_path(output_dir, name))]
        for path in stale + list(output_dir.glob(f"{name}.tmp-*")):
            path.unlink()
        if _shard_is_complete(output_dir, name, fingerprint):
            result.shards_skipped.append(name)
        else:
            pending.append((index, shard_items, fingerprint))

    from repa.data.estimate import check_disk_space

    check_disk_space(
        items, output_dir, prefix, shard_size=shard_size, report=on_estimate if rank == 0 else None,
        ignore=ignore_disk_space, resolution=resolution, tokenizer=tokenizer, encoder=encoder,
        latent_dtype=latent_dtype, cache_flipped_features=cache_flipped_features, text_encoder=text_encoder,
    )  # fmt: skip
    if pending:
        need_pixels = tokenizer is not None or encoder is not None
        pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
        # spawn, not fork: the parent may hold CUDA contexts or torch thread pools.

        def submit(shard_items: list[SourceItem]) -> Any:
            jobs = [(item, resolution, need_pixels) for item in shard_items]
            if pool is None:
                return [_prepare_image(job) for job in jobs]
            return pool.map_async(_prepare_image, jobs, chunksize=max(1, len(jobs) // (4 * workers)))

        try:
            # Keep at most two shards in flight so memory stays bounded when encoding is slower.
            in_flight = deque(submit(shard_items) for _, shard_items, _ in pending[:2])
            for position, (index, shard_items, fingerprint) in enumerate(pending):
                ready = in_flight.popleft()
                samples = ready if pool is None else ready.get()
                if position + 2 < len(pending):
                    in_flight.append(submit(pending[position + 2][1]))
                _write_shard(
                    output_dir, prefix, index, shard_items, samples, fingerprint,
                    tokenizer=tokenizer, encoder=encoder, latent_dtype=latent_dtype,
                    cache_flipped_features=cache_flipped_features, encode_batch_size=encode_batch_size,
                    text_encoder=text_encoder,
                )  # fmt: skip
                result.shards_written.append(fmt.shard_name(prefix, index))
        finally:
            if pool is not None:
                pool.terminate()

    if state is not None and state.num_processes > 1 and state.use_distributed:
        state.wait_for_everyone()
    if rank == 0:
        if text_encoder is not None:
            _write_null_text(output_dir, text_encoder)
        result.manifest_path = _write_manifest(
            output_dir, prefix, num_shards, class_names, options, wait_timeout_s=wait_timeout_s
        )
        expected = {fmt.shard_name(prefix, i) for i in range(num_shards)}
        stale = sorted(p.name for p in output_dir.glob(f"{prefix}-*.tar") if p.name not in expected)
        if stale:
            message = f"{output_dir}: shards not in the manifest (from an earlier build?): {stale[:5]}"
            warnings.warn(message, stacklevel=2)
    return result


def _sidecar_path(output_dir: Path, name: str) -> Path:
    return output_dir / (name[: -len(".tar")] + ".json")


def _shard_is_complete(output_dir: Path, name: str, fingerprint: str) -> bool:
    sidecar = _sidecar_path(output_dir, name)
    if not (output_dir / name).exists() or not sidecar.exists():
        return False
    try:
        record = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return False
    return record.get("fingerprint") == fingerprint and record.get("sha256") == file_sha256(output_dir / name)


def _write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    write_bytes_atomic(path, (json.dumps(record, indent=1) + "\n").encode())


def _write_shard(
    output_dir: Path,
    prefix: str,
    index: int,
    items: list[SourceItem],
    samples: list[tuple[bytes, np.ndarray | None]],
    fingerprint: str,
    *,
    tokenizer: Any,
    encoder: Any,
    latent_dtype: str,
    cache_flipped_features: bool,
    encode_batch_size: int,
    text_encoder: Any = None,
) -> None:
    """Encode (optional caches) and write one shard under a temporary name, then rename it."""
    caches: dict[str, np.ndarray] = {}
    # per item: its captions' embeddings float16 (K, L, D) and masks bool (K, L)
    text_rows: list[tuple[np.ndarray, np.ndarray]] = []
    if text_encoder is not None:
        flat = [caption for item in items for caption in item.captions]
        embeddings, masks = encode_captions(text_encoder, flat, encode_batch_size)
        bounds = np.cumsum([0, *(len(item.captions) for item in items)])
        text_rows = [(embeddings[a:b], masks[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    if tokenizer is not None or encoder is not None:
        images = np.stack([pixels for _, pixels in samples])  # (N, R, R, 3) uint8
    if tokenizer is not None:
        encode = tokenizer.encode_moments
        caches[fmt.LATENTS] = _run_batched(tokenizer, encode, images, encode_batch_size, latent_dtype)
        flipped = np.ascontiguousarray(images[:, :, ::-1])  # mirror the width axis
        caches[fmt.LATENTS_FLIP] = _run_batched(tokenizer, encode, flipped, encode_batch_size, latent_dtype)
    if encoder is not None:
        caches[fmt.FEATURES] = _run_batched(encoder, encoder, images, encode_batch_size, np.float16)
        if cache_flipped_features:
            flipped = np.ascontiguousarray(images[:, :, ::-1])
            caches[fmt.FEATURES_FLIP] = _run_batched(encoder, encoder, flipped, encode_batch_size, np.float16)

    name = fmt.shard_name(prefix, index)
    final = output_dir / name
    counts = Counter(item.label for item in items)
    with atomic_path(final) as temporary, open(temporary, "wb") as handle:
        writer = _HashingWriter(handle)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.USTAR_FORMAT) as archive:
            for position, (item, (png, _)) in enumerate(zip(items, samples)):
                base = f"{index:06d}{position:06d}"  # unique across shards, sorts in build order
                _add_member(archive, f"{base}.{fmt.IMAGE}", png)
                _add_member(archive, f"{base}.{fmt.LABEL}", str(item.label).encode())
                _add_member(archive, f"{base}.{fmt.SOURCE_KEY}", item.key.encode())
                if item.captions:
                    _add_member(archive, f"{base}.{fmt.CAPTIONS}", json.dumps(list(item.captions)).encode())
                for suffix, values in caches.items():
                    _add_member(archive, f"{base}.{suffix}", fmt.npy_bytes(values[position]))
                if text_rows:
                    _add_member(archive, f"{base}.{fmt.TEXT}", fmt.npy_bytes(text_rows[position][0]))
                    _add_member(archive, f"{base}.{fmt.TEXT_MASK}", fmt.npy_bytes(text_rows[position][1]))
    _write_json_atomic(
        _sidecar_path(output_dir, name),
        {
            "name": name,
            "num_samples": len(items),
            "sha256": writer.sha256.hexdigest(),
            "bytes": writer.size,
            "fingerprint": fingerprint,
            "counts_per_class": {str(label): counts[label] for label in sorted(counts)},
            "first_key": items[0].key,
            "last_key": items[-1].key,
            "shapes": {
                **{suffix: list(values.shape[1:]) for suffix, values in caches.items()},
                **({fmt.TEXT: list(text_rows[0][0].shape[1:])} if text_rows else {}),  # per caption (L, D)
            },
            **({"num_captions": sum(len(item.captions) for item in items)} if items[0].captions else {}),
        },
    )


def _write_manifest(
    output_dir: Path,
    prefix: str,
    num_shards: int,
    class_names: list[str],
    options: dict[str, Any],
    *,
    wait_timeout_s: float,
) -> str:
    """Main process: gather every shard's sidecar (waiting for other ranks) into manifest.json."""
    names = [fmt.shard_name(prefix, i) for i in range(num_shards)]
    deadline = time.monotonic() + wait_timeout_s
    while True:
        missing = [name for name in names if not _sidecar_path(output_dir, name).exists()]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"shards still missing after {wait_timeout_s:.0f} s: {missing[:5]}")
        time.sleep(1.0)
    records = [json.loads(_sidecar_path(output_dir, name).read_text()) for name in names]
    counts_per_class = [0] * len(class_names)
    for record in records:
        for label, count in record["counts_per_class"].items():
            counts_per_class[int(label)] += count
    fields = {"image": fmt.IMAGE, "label": fmt.LABEL, "source_key": fmt.SOURCE_KEY}
    shapes = records[0]["shapes"]
    if options["cache_latents"]:
        fields.update(latents=fmt.LATENTS, latents_flipped=fmt.LATENTS_FLIP)
    if options["cache_features"]:
        fields["features"] = fmt.FEATURES
        if options["cache_flipped_features"]:
            fields["features_flipped"] = fmt.FEATURES_FLIP
    captions = {}
    if options.get("captions"):
        fields["captions"] = fmt.CAPTIONS
        captions["num_captions"] = sum(record["num_captions"] for record in records)
    if options.get("cache_text"):
        fields.update(text=fmt.TEXT, text_mask=fmt.TEXT_MASK)
        captions["text_shape"] = shapes.get(fmt.TEXT)  # per caption (L, D)
        captions["null_text"] = {"embeddings": fmt.NULL_TEXT, "mask": fmt.NULL_TEXT_MASK}
    manifest = {
        "format": fmt.MANIFEST_FORMAT,
        "pattern": fmt.brace_pattern(prefix, num_shards),
        "num_shards": num_shards,
        "num_samples": sum(record["num_samples"] for record in records),
        "resolution": options["resolution"],
        "num_classes": len(class_names),
        "class_names": class_names,
        "counts_per_class": counts_per_class,
        "fields": fields,
        "latent_shape": shapes.get(fmt.LATENTS),
        "feature_shape": shapes.get(fmt.FEATURES),
        **captions,
        "options": options,
        "shards": [
            {key: record[key] for key in ("name", "num_samples", "sha256", "bytes", "counts_per_class")}
            for record in records
        ],
    }
    path = output_dir / fmt.MANIFEST_NAME
    _write_json_atomic(path, manifest)
    return str(path)
