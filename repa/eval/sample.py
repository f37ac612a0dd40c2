"""Sample N images for evaluation, on any number of processes, into the ADM evaluator's `.npz`.

The sample set is a function of (weights, sampler settings, N, seed, label scheme) only:
  - seeds: sample i draws its initial noise and every SDE increment from its own generator,
    seeded by `sample_seed(seed, i)` (numpy SeedSequence of [seed, i]), so neither the batch it
    lands in nor the number of processes changes it;
  - labels: "balanced" (default) gives sample i the class perm_b[i % K] with b = i // K, where
    perm_b is a permutation of the K classes drawn from numpy's generator seeded by
    [seed, 1, b]: every consecutive block of K samples holds each class once, so 50,000 samples
    of ImageNet have exactly 50 per class (ADM/REPA protocol) and any prefix of whole blocks is
    balanced. "random": i.i.d. uniform classes from the generator seeded by [seed, 2].

Work is split in chunks of `chunk_size` consecutive indices. Each process takes every
world-th chunk not yet on disk (processes rank, rank + world, ... of the remaining list), writes
each finished chunk atomically to `OUTPUT.parts/chunk-XXXXXX.npz`, and rank 0 merges them in
index order into OUTPUT (streamed, temporary file + rename). An interrupted run restarted with
the same command skips finished chunks: no sample is made twice or lost, whatever the new world
size or batch size. `OUTPUT.parts/settings.json` records what the chunks were made with; a
restart with different settings is refused rather than mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from repa.eval.checkpoints import Generator
from repa.eval.npz import iter_npz_rows, write_npz_streaming
from repa.models.ddt_sharing import SHARE_SCHEDULES
from repa.precision import CHOICES as PRECISION_CHOICES
from repa.precision import resolve_precision
from repa.utils.files import atomic_path, write_bytes_atomic

LABEL_SCHEMES = ("balanced", "random", "ordered")
_BALANCED_STREAM, _RANDOM_STREAM = 1, 2


@dataclass(frozen=True)
class SamplerSettings:
    """How to integrate: REPA's published settings are the defaults (SDE, 250 steps, CFG 1.8 on [0, 0.7])."""

    mode: str = "sde"
    method: str = "euler"
    num_steps: int = 250
    cfg_scale: float = 1.8
    guidance_low: float = 0.0
    guidance_high: float = 0.7
    # DDT encoder sharing (repa.models.ddt_sharing): the condition encoder runs at every k-th model
    # evaluation ("uniform") or at DDT's statistical choice of as many ("dp"); 1: at every one.
    ddt_share: int = 1
    ddt_share_schedule: str = "uniform"
    # autocast for the model, the sampler state stays float32: auto | fp32 | bf16 | fp16
    # (repa.precision; REPA's published samples are fp32)
    precision: str = "auto"
    # guide only the first N latent channels (DiT/SiT/LightningDiT/PixArt: 3); None: all (REPA)
    cfg_channels: int | None = None
    # timestep shift k: grid times t -> k t / (1 + (k - 1) t) (repa.transport.samplers); 1: none
    time_shift: float = 1.0
    # REG models only: the CFG scale of the class token (None: cfg_scale; 0: not guided, as REG)
    cls_cfg_scale: float | None = None

    def __post_init__(self) -> None:
        if not self.time_shift > 0:
            raise ValueError(f"time_shift must be > 0 (1 = no shift), got {self.time_shift}")
        if self.cls_cfg_scale is not None and self.cls_cfg_scale < 0:
            raise ValueError(
                f"--cls-cfg-scale must be >= 0 (0: no class-token guidance), got {self.cls_cfg_scale}"
            )
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise ValueError(f"cfg_channels must be >= 1 (or None for all channels), got {self.cfg_channels}")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"precision {self.precision!r}: choose one of {', '.join(PRECISION_CHOICES)}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.ddt_share < 1:
            raise ValueError(f"--ddt-share must be >= 1 (1: no sharing), got {self.ddt_share}")
        if self.ddt_share_schedule not in SHARE_SCHEDULES:
            raise ValueError(
                f"--ddt-share-schedule {self.ddt_share_schedule!r} is not one of: "
                f"{', '.join(SHARE_SCHEDULES)}"
            )

    def resolved(self, device: torch.device | str | None = None) -> SamplerSettings:
        """These settings with `auto` replaced by the precision chosen for `device`, so that what
        records and caches hold (chunk settings, curve results) says what was actually run."""
        choice = resolve_precision(self.precision, device)
        return dataclasses.replace(self, precision=choice.label)

    def to_dict(self) -> dict:
        """The record of these settings; cfg_channels and time_shift only when set, so records
        (chunk settings, curve caches) made before they existed still match."""
        record = asdict(self)
        if record["cfg_channels"] is None:
            del record["cfg_channels"]
        if record["time_shift"] == 1.0:  # likewise: records made before the shift existed match
            del record["time_shift"]
        if record["ddt_share"] == 1:  # no sharing, whatever the schedule: records from before match
            del record["ddt_share"], record["ddt_share_schedule"]
        if record["cls_cfg_scale"] is None:  # likewise
            del record["cls_cfg_scale"]
        return record


# ---- what each sample is -------------------------------------------------------------------------


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`: 63 bits from numpy's SeedSequence([seed, index])."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    low, high = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int(high & 0x7FFFFFFF) << 32 | int(low)


def class_labels(num_samples: int, num_classes: int, seed: int, scheme: str = "balanced") -> np.ndarray:
    """int64 (num_samples,) class labels; see the module docstring for the two schemes."""
    if scheme == "balanced":
        blocks = math.ceil(num_samples / num_classes)
        perms = [
            np.random.default_rng([seed, _BALANCED_STREAM, b]).permutation(num_classes) for b in range(blocks)
        ]
        return np.concatenate(perms)[:num_samples].astype(np.int64) if perms else np.zeros(0, np.int64)
    if scheme == "ordered":  # label i mod K: a text model's captions in their order, one image each
        return (np.arange(num_samples) % num_classes).astype(np.int64)
    if scheme == "random":
        return (
            np.random.default_rng([seed, _RANDOM_STREAM])
            .integers(0, num_classes, num_samples)
            .astype(np.int64)
        )
    raise ValueError(f"unknown label scheme {scheme!r}; choose one of: {', '.join(LABEL_SCHEMES)}")


# ---- sampling batches ----------------------------------------------------------------------------


@torch.no_grad()
def generate_batch(
    generator: Generator,
    labels: torch.Tensor,
    seeds: list[int],
    settings: SamplerSettings,
    device: torch.device | str | None = None,
    velocity_fn: Callable | None = None,
) -> torch.Tensor:
    """uint8 images (B, 3, H, W) for these labels (B,) and per-sample seeds.

    velocity_fn: what the sampler calls (default: the model's velocity, or with --ddt-share a
    DDT's encoder-sharing wrapper). A REG model (class_token_dim > 0) is sampled through
    ClassTokenSampling: its class token is integrated with the latent and discarded.
    """
    from repa.transport import sample

    device = torch.device(device) if device is not None else next(generator.model.parameters()).device
    autocast_dtype = resolve_precision(settings.precision, device).autocast_dtype
    joint = ClassTokenSampling.for_model(generator.model, generator.latent_shape)
    state_shape, cfg_channels, cfg_scale_map = generator.latent_shape, settings.cfg_channels, None
    if joint is not None:
        if velocity_fn is not None or settings.ddt_share != 1:
            raise ValueError("a REG model samples with its own velocity (no --ddt-share)")
        velocity_fn, state_shape, cfg_channels = joint, joint.state_shape, None
        cfg_scale_map = joint.scale_map(settings.cfg_scale, settings.cls_cfg_scale, settings.cfg_channels)
    null_label = getattr(generator.model, "null_label", None)  # (text models: CaptionVelocity's)
    if generator.captions is not None:
        # a text model: the labels are rows of the caption table; CFG's unconditional half takes
        # the null caption (CaptionVelocity's null label), so the samplers need no change
        from repa.models.cross_attention import CaptionVelocity

        if velocity_fn is not None or settings.ddt_share != 1:
            raise ValueError("a text model samples through its captions (no --ddt-share)")
        embeddings, mask = generator.captions
        rows = labels.long().cpu()
        velocity_fn = CaptionVelocity(
            generator.model,
            embeddings[rows].to(device).float(),
            None if mask is None else mask[rows].to(device),
        )
        labels, null_label = velocity_fn.rows, velocity_fn.null_label
    elif generator.text_conditioned:
        raise ValueError(
            "this is a text model: give it captions to sample (repa sample --prompts FILE.txt or "
            "--captions-from SHARDS; in code Generator.with_captions)"
        )
    velocity_fn = velocity_fn or ddt_sharing_velocity(generator, settings, device) or generator.model.velocity
    with torch.autocast(
        device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        latents = sample(
            velocity_fn,
            state_shape,
            labels.to(device),
            seeds,
            mode=settings.mode,
            method=settings.method,
            num_steps=settings.num_steps,
            cfg_scale=settings.cfg_scale,
            guidance_low=settings.guidance_low,
            guidance_high=settings.guidance_high,
            null_label=null_label,
            path=generator.path_type,
            cfg_channels=cfg_channels,
            time_shift=settings.time_shift,
            cfg_scale_map=cfg_scale_map,
        )
    if joint is not None:
        latents = joint.latents(latents)  # the generated class token is discarded
    return generator.decode(latents)  # decoded in float32, rounded to uint8


class ClassTokenSampling:
    """A REG model as one velocity field on the joint state (latent, class token), flattened to
    (B, C*H*W + D_c), so every sampler integrates both with the shared t and per-sample noise:
    the class token starts from N(0, I) like the latent (never from an encoder) and is dropped
    at the end. `scale_map` gives the class token its own CFG scale (REG's --cls-cfg-scale)."""

    def __init__(self, model, latent_shape: tuple[int, int, int]):
        self.model, self.latent_shape = model, tuple(latent_shape)
        self.class_token_dim = int(model.config.class_token_dim)
        self.latent_size = math.prod(self.latent_shape)
        self.state_shape = (self.latent_size + self.class_token_dim,)

    @classmethod
    def for_model(cls, model, latent_shape) -> ClassTokenSampling | None:
        """The wrapper for a REG model, None for any other."""
        return (
            cls(model, latent_shape)
            if getattr(getattr(model, "config", None), "class_token_dim", 0)
            else None
        )

    def split(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C*H*W + D_c) -> latents (B, C, H, W), class tokens (B, D_c)."""
        latent, class_token = state.split([self.latent_size, self.class_token_dim], dim=1)
        return latent.reshape(-1, *self.latent_shape), class_token

    def latents(self, state: torch.Tensor) -> torch.Tensor:
        return self.split(state)[0]

    def __call__(self, state: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        latent, class_token = self.split(state)
        velocity, class_velocity = self.model.velocity(latent, t, labels, class_token=class_token)
        return torch.cat([velocity.flatten(1), class_velocity.to(velocity.dtype)], dim=1)

    def scale_map(
        self, cfg_scale: float, cls_cfg_scale: float | None, cfg_channels: int | None
    ) -> torch.Tensor:
        """(C*H*W + D_c,) scales: cfg_scale on the latent (1, the conditional velocity, on channels
        from cfg_channels on), cls_cfg_scale on the class token (None: cfg_scale; 0: 1, REG's "no
        class-token guidance")."""
        channels = self.latent_shape[0]
        latent = torch.full(self.latent_shape, float(cfg_scale), dtype=torch.float64)
        if cfg_channels is not None:
            if cfg_channels > channels:
                raise ValueError(f"cfg_channels {cfg_channels} exceeds the latent's {channels} channels")
            latent[cfg_channels:] = 1.0
        cls_scale = cfg_scale if cls_cfg_scale is None else (cls_cfg_scale or 1.0)
        return torch.cat(
            [latent.flatten(), torch.full((self.class_token_dim,), float(cls_scale), dtype=torch.float64)]
        )


# DDT's template for the dp schedule: 8 samples of fixed seeds and classes (DDT: seed 0).
DP_TEMPLATE_SIZE = 8
_dp_schedules: dict = {}  # (id(model), settings record) -> refresh evaluations


def ddt_sharing_velocity(generator: Generator, settings: SamplerSettings, device):
    """A fresh EncoderSharing for one batch when settings.ddt_share > 1, else None.

    The dp schedule is measured once per model and settings, on the template, and cached.
    """
    from repa.models.ddt_sharing import EncoderSharing, calibrate_dp_schedule

    if settings.ddt_share == 1:
        return None
    model = generator.model
    if not hasattr(model, "encode"):
        raise ValueError("--ddt-share needs a DDT checkpoint (a model with --ddt-encoder-depth > 0)")
    if settings.ddt_share_schedule == "uniform":
        return EncoderSharing(model, settings.ddt_share)
    key = (id(model), json.dumps(settings.to_dict(), sort_keys=True))
    if key not in _dp_schedules:
        template_classes = np.random.default_rng(0).integers(0, generator.num_classes, DP_TEMPLATE_SIZE)
        labels = torch.from_numpy(template_classes)
        seeds = list(range(DP_TEMPLATE_SIZE))
        plain = dataclasses.replace(settings, ddt_share=1)

        def run_template(recorder) -> None:
            generate_batch(generator, labels, seeds, plain, device, velocity_fn=recorder)

        _dp_schedules[key] = calibrate_dp_schedule(model, run_template, settings.ddt_share, DP_TEMPLATE_SIZE)
    return EncoderSharing(model, _dp_schedules[key])


def generate_indices(
    generator: Generator,
    indices: np.ndarray,
    labels: np.ndarray,
    settings: SamplerSettings,
    *,
    seed: int,
    batch_size: int,
    device: torch.device | str | None = None,
) -> Iterator[torch.Tensor]:
    """uint8 (b, 3, H, W) batches of the given sample indices, with labels[indices]."""
    for start in range(0, len(indices), batch_size):
        batch_indices = indices[start : start + batch_size]
        batch_labels = torch.from_numpy(labels[batch_indices])
        seeds = [sample_seed(seed, int(i)) for i in batch_indices]
        yield generate_batch(generator, batch_labels, seeds, settings, device)


def chunk_indices(chunk: int, chunk_size: int, num_samples: int) -> np.ndarray:
    """The sample indices of chunk `chunk`: chunk_size consecutive ones (fewer in the last)."""
    return np.arange(chunk * chunk_size, min((chunk + 1) * chunk_size, num_samples))


def chunks_of_rank(chunks: list[int], rank: int, world_size: int) -> list[int]:
    """The chunks process `rank` of `world_size` makes: every world-th of the list from its rank."""
    return chunks[rank::world_size]


def generate_share(
    generator: Generator,
    num_samples: int,
    settings: SamplerSettings,
    *,
    seed: int = 0,
    labels: str = "balanced",
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, Iterator[torch.Tensor]]:
    """This process's share of the first `num_samples` images, in memory (`--eval-every`).

    The split is `sample_chunks`'s, with chunks of at most one batch, so that every process has
    work while there are samples for it. Returns (int64 indices of the share, in the order the
    batches hold them; the uint8 (b, 3, H, W) batches). The images of an index do not depend on
    the split: the union over ranks is the set `generate_images` makes.
    """
    chunk_size = max(1, min(batch_size, math.ceil(num_samples / world_size)))
    mine = chunks_of_rank(list(range(math.ceil(num_samples / chunk_size))), rank, world_size)
    parts = [chunk_indices(chunk, chunk_size, num_samples) for chunk in mine]
    indices = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    all_labels = class_labels(num_samples, generator.num_classes, seed, labels)
    batches = generate_indices(
        generator, indices, all_labels, settings, seed=seed, batch_size=batch_size, device=device
    )
    return indices, batches


def generate_images(
    generator: Generator,
    num_samples: int,
    settings: SamplerSettings,
    *,
    seed: int = 0,
    labels: str = "balanced",
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> Iterator[torch.Tensor]:
    """In-process stream of the first `num_samples` images of the set (periodic eval, curves)."""
    all_labels = class_labels(num_samples, generator.num_classes, seed, labels)
    yield from generate_indices(
        generator,
        np.arange(num_samples),
        all_labels,
        settings,
        seed=seed,
        batch_size=batch_size,
        device=device,
    )


# ---- chunks on disk ------------------------------------------------------------------------------


def prompts_path_for(output: str | os.PathLike) -> Path:
    """Where a text model's sample set lists each image's caption: OUTPUT.npz -> OUTPUT.prompts.txt."""
    return Path(output).with_suffix(".prompts.txt")


def parts_dir_for(output: str | os.PathLike) -> Path:
    return Path(f"{output}.parts")


def _chunk_path(parts_dir: Path, chunk: int) -> Path:
    return parts_dir / f"chunk-{chunk:06d}.npz"


def _save_atomic(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez would append .npz
        np.savez(handle, **arrays)


def prepare_parts(parts_dir: Path, record: dict) -> None:
    """Create the parts folder with its settings record, or check an existing one matches."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    settings_path = parts_dir / "settings.json"
    if settings_path.is_file():
        existing = json.loads(settings_path.read_text())
        if existing != record:
            changed = sorted(k for k in set(existing) | set(record) if existing.get(k) != record.get(k))
            raise ValueError(
                f"{parts_dir} holds chunks made with other settings (differs in {changed}); rerun with the "
                f"original settings to resume, or delete {parts_dir} to start over"
            )
    else:
        _write_json_atomic(settings_path, record)


def _write_json_atomic(path: Path, record: dict) -> None:
    write_bytes_atomic(path, json.dumps(record, indent=1, sort_keys=True).encode())


def pending_chunks(parts_dir: Path, num_samples: int, chunk_size: int) -> list[int]:
    """Chunk numbers whose file is not on disk yet."""
    total = math.ceil(num_samples / chunk_size)
    return [c for c in range(total) if not _chunk_path(parts_dir, c).is_file()]


def sample_chunks(
    generator: Generator,
    parts_dir: str | os.PathLike,
    *,
    num_samples: int,
    settings: SamplerSettings,
    seed: int = 0,
    labels: str = "balanced",
    batch_size: int = 64,
    chunk_size: int = 500,
    rank: int = 0,
    world_size: int = 1,
    pending: list[int] | None = None,
    device: torch.device | str | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """One process's share: sample its chunks of the remaining list and write each atomically.

    pending: the remaining chunks as all processes saw them at start (default: read from disk).
    batch_size: this process's batch. on_chunk(chunk): called after each chunk is on disk.
    Returns the number of images this process made.
    """
    parts_dir = Path(parts_dir)
    pending = pending_chunks(parts_dir, num_samples, chunk_size) if pending is None else pending
    all_labels = class_labels(num_samples, generator.num_classes, seed, labels)
    made = 0
    for chunk in chunks_of_rank(pending, rank, world_size):
        indices = chunk_indices(chunk, chunk_size, num_samples)
        batches = generate_indices(
            generator, indices, all_labels, settings, seed=seed, batch_size=batch_size, device=device
        )
        images = torch.cat([b.cpu() for b in batches]).permute(0, 2, 3, 1).numpy()  # (n, H, W, 3) uint8
        _save_atomic(
            _chunk_path(parts_dir, chunk), images=images, indices=indices, labels=all_labels[indices]
        )
        made += len(indices)
        if on_chunk is not None:
            on_chunk(chunk)
    return made


def merge_chunks(
    parts_dir: str | os.PathLike, output: str | os.PathLike, num_samples: int, chunk_size: int
) -> Path:
    """Stream every chunk, in index order, into OUTPUT (`arr_0` uint8 NHWC, `labels` int64)."""
    parts_dir = Path(parts_dir)
    missing = pending_chunks(parts_dir, num_samples, chunk_size)
    if missing:
        raise RuntimeError(f"cannot merge {parts_dir}: chunks {missing[:10]} are missing")
    total = math.ceil(num_samples / chunk_size)
    labels: list[np.ndarray] = []
    with np.load(_chunk_path(parts_dir, 0)) as first:
        image_shape = first["images"].shape[1:]

    def chunks() -> Iterator[np.ndarray]:
        for chunk in range(total):
            with np.load(_chunk_path(parts_dir, chunk)) as data:
                expected = chunk_indices(chunk, chunk_size, num_samples)
                if not np.array_equal(data["indices"], expected):
                    raise RuntimeError(
                        f"chunk {chunk} in {parts_dir} holds indices other than {expected[[0, -1]]}"
                    )
                labels.append(data["labels"])
                yield data["images"]

    extra = lambda: {"labels": np.concatenate(labels)}  # noqa: E731 - read once the chunks are consumed
    return write_npz_streaming(output, (num_samples, *image_shape), chunks(), extra=extra)


# ---- the whole job -------------------------------------------------------------------------------


def sample_to_npz(
    generator: Generator,
    output: str | os.PathLike,
    *,
    num_samples: int,
    settings: SamplerSettings,
    seed: int = 0,
    labels: str = "balanced",
    batch_size: int = 64,
    chunk_size: int = 500,
    grid: str | os.PathLike | None = None,
    keep_parts: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> Path:
    """Sample `num_samples` images into OUTPUT on every process of the launch (or just this one).

    batch_size is global, split across processes (as REPA's --batch-size). Works under
    `accelerate launch` / `torchrun` (processes found through accelerate's PartialState) and as a
    plain single process. A finished OUTPUT whose record (OUTPUT.json) matches is left as is.
    """
    from accelerate import PartialState

    # Without cpu=True accelerate ignores torchrun's environment on machines without a GPU and
    # every process would run alone (world size 1) over the same files.
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world, device = state.process_index, state.num_processes, state.device
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if world != launched:
        raise RuntimeError(f"launched with WORLD_SIZE={launched} but accelerate sees {world} process(es)")
    output = Path(output)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if rank == 0:
        print(f"sampling {resolve_precision(settings.precision, device).summary()}", flush=True)
    settings = settings.resolved(device)
    record = {
        "weights": generator.identity,
        "step": generator.step,
        "settings": settings.to_dict(),
        "num_samples": num_samples,
        "seed": seed,
        "labels": labels,
        "num_classes": generator.num_classes,
        "chunk_size": chunk_size,
        "image_size": generator.resolution,
    }
    if generator.caption_texts is not None:  # a text model: which captions (a changed list resamples)
        digest = hashlib.sha256("\n".join(generator.caption_texts).encode()).hexdigest()
        record["captions"] = {"count": len(generator.caption_texts), "sha256": digest}
    record_path = Path(f"{output}.json")
    if output.is_file():
        if record_path.is_file() and json.loads(record_path.read_text()).get("sampling") == record:
            return output
        raise FileExistsError(
            f"{output} exists and was made with other settings; remove it or pick another --output"
        )
    parts_dir = parts_dir_for(output)
    if rank == 0:
        prepare_parts(parts_dir, record)
    state.wait_for_everyone()
    if rank != 0:
        prepare_parts(parts_dir, record)  # read-only check: the record exists now
    pending = pending_chunks(parts_dir, num_samples, chunk_size)
    state.wait_for_everyone()  # every process has the same list before anyone writes a chunk

    generator.to(device)
    start = time.perf_counter()
    made = sample_chunks(
        generator,
        parts_dir,
        num_samples=num_samples,
        settings=settings,
        seed=seed,
        labels=labels,
        batch_size=max(1, math.ceil(batch_size / world)),
        chunk_size=chunk_size,
        rank=rank,
        world_size=world,
        pending=pending,
        device=device,
        on_chunk=on_chunk,
    )
    elapsed = time.perf_counter() - start
    state.wait_for_everyone()
    if rank == 0:
        merge_chunks(parts_dir, output, num_samples, chunk_size)
        summary = {"sampling": record, "seconds": elapsed, "images_made_by_rank0": made, "world_size": world}
        _write_json_atomic(record_path, summary)
        if generator.caption_texts is not None:  # image i's caption on line i, beside the .npz
            rows = class_labels(num_samples, generator.num_classes, seed, labels)
            texts = [" ".join(generator.caption_texts[row].split()) for row in rows]
            write_bytes_atomic(prompts_path_for(output), ("\n".join(texts) + "\n").encode())
        if grid is not None:
            from repa.utils.images import save_image_grid

            first = next(iter_npz_rows(output, 64))  # (b, H, W, 3)
            save_image_grid(first.transpose(0, 3, 1, 2), grid)
        if not keep_parts:
            import shutil

            shutil.rmtree(parts_dir, ignore_errors=True)
    state.wait_for_everyone()
    return output
