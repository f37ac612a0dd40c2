"""Reading shards: an endless, resumable training stream per rank, and an in-order evaluation reader.

Training stream (`make_train_stream`), per rank:
  shards -> split by (rank, data-loader worker) -> resampled forever (a fresh seeded permutation of
  the worker's own shards each pass) -> seeded shuffle buffer of raw samples (large members of
  local shards stay in the file until drawn) -> read and decode only the fields asked for
  (`fields`: what the training method's step reads; a PNG is never read when the step needs only
  cached latents and features), optional horizontal flip (with the cached moments of the flipped
  image), each sample written straight into its row of a batch held in one of the worker's reused
  shared-memory slots -> the training process copies the batch out (into pinned memory on CUDA)
  and frees the slot -> `Batch`.
It does its own node/worker splitting and must not be passed through `accelerator.prepare`.
PNGs decode with pyspng where installed, else PIL (repa.data.png; `png_decoder()` names it).
Measured against REPA's published loader and against bare PNG decoding in benchmarks/bench_data.py.

Why slots instead of torch's own hand-off (workers yield tensors, torch passes them through new
shared memory): side by side at 256 px with 2 workers (benchmarks/results/data-handoff-ab.json),
batches built in fresh shared memory in the worker, as default_collate builds them, ran the
cached paths at 0.65x the slot ring's rate (latents only 1/1.54, latents + features 1/1.53;
images + latents 1/1.06): every fresh batch faults its pages in twice, in the worker and in the
training process. Issue 20 allowed a custom hand-off only for a loss over 10%. It uses public API
only: multiprocessing semaphores, `share_memory_`, and the lifetime `torch.from_numpy` gives its
array, for the recycled copy-out memory (`_RecycledBuffers`).

Guarantees (tested in tests/test_data_stream.py):
- Every rank and worker reads a disjoint set of shards; every rank yields the same number of
  batches (the stream is endless; `num_batches` cuts every rank at the same count), so DDP never
  waits on a rank that ran dry.
- Fewer shards than ranks x workers is an error at start-up that says how many are needed.
- Randomness comes only from `seed`: worker w of rank r draws from a generator seeded by
  (seed, r, w, resume_batches), never from the pid or the clock.
- Resuming: a stream built with `resume_batches=n` (the number of batches this rank already
  consumed, `stream.batches_seen` at checkpoint time) is deterministic given
  (seed, rank, world_size, num_workers, n); it does not replay the batches drawn before the
  interruption (its generators are fresh, not rewound), and the count of samples seen is exact
  (`n * batch_size_per_rank` plus what the new stream yields). It does not reproduce the exact
  sample order an uninterrupted run would have seen.
- A corrupt sample (any member it reads: image, label, cached latents or features; damaged PNGs
  are refused by a CRC check of every chunk) or a truncated or unreadable shard is skipped with a
  warning and counted (`stream.num_skipped`, for the training log), once each time it is met; a
  member of a field not asked for is never read, so its damage is no skip. A worker with nothing
  decodable left raises (a whole pass without one good sample), naming the fields it read.

Use in a training loop (the loop saves `stream.state_dict()` with its checkpoint):

    stream = make_train_stream("shards/train-{000000..000127}.tar", batch_size_per_rank=32,
                               rank=accelerator.process_index, world_size=accelerator.num_processes,
                               seed=seed, resume_batches=saved["batches_seen"], flip=True,
                               fields=method.batch_fields(cached))  # e.g. {"latents", "features"}
    for batch in stream:
        batch = batch.to(accelerator.device)
        ...; log(data_skipped=stream.num_skipped, samples_seen=stream.samples_seen)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import random
import signal
import warnings
import weakref
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from repa.data import shards as fmt
from repa.data.png import decode_png, png_decoder  # noqa: F401 (re-exported: the readers' decoder)
from repa.utils.process import die_with_parent


class StreamError(RuntimeError):
    """The stream cannot go on (nothing decodable left, or shards lacking a requested field)."""


# The batch fields a stream can be asked for (`make_train_stream(fields=...)`); labels and keys
# are always read. "latents": the cached tokenizer moments (of the flipped image where flipped);
# "features": the cached encoder tokens; "text": the cached token embeddings and mask of one of
# the image's captions; "captions": that caption's text. Text and caption are drawn together
# (`caption_index`).
FIELDS = ("images", "latents", "features", "text", "captions")


@dataclass
class Batch:
    """One batch for one rank."""

    # uint8 (B, 3, H, W), already flipped where `flipped`; None when the stream was not asked for
    # images (their PNG members are then never read). Stored channels_last (NHWC strides):
    # PNG decodes to HWC, and a transposing copy in the worker would be a second full copy of
    # every batch; `.to(device)` and `.float()` keep the layout, `.contiguous()` converts.
    images: torch.Tensor | None
    labels: torch.Tensor  # int64 (B,)
    moments: torch.Tensor | None  # float32 (B, 2C, h, w): cat(mean, std) of the image as returned
    features: torch.Tensor | None  # float16 (B, T, D): encoder target tokens of the image as returned
    keys: list[str]  # source keys
    flipped: torch.Tensor  # bool (B,)
    worker: int = 0  # global id (rank * num_workers + worker) of the data-loader worker that made it
    skipped: int = 0  # samples/shards that worker has skipped so far (cumulative)
    text: torch.Tensor | None = None  # float16 (B, L, D): cached token embeddings of the drawn caption
    text_mask: torch.Tensor | None = None  # bool (B, L): True on the drawn caption's tokens
    captions: list[str] | None = None  # the drawn captions, when asked for

    def __len__(self) -> int:
        return len(self.keys)

    def _map(self, fn: Any) -> Batch:
        return Batch(
            images=None if self.images is None else fn(self.images),
            labels=fn(self.labels),
            moments=None if self.moments is None else fn(self.moments),
            features=None if self.features is None else fn(self.features),
            keys=self.keys,
            flipped=fn(self.flipped),
            worker=self.worker,
            skipped=self.skipped,
            text=None if self.text is None else fn(self.text),
            text_mask=None if self.text_mask is None else fn(self.text_mask),
            captions=self.captions,
        )

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread."""
        return self._map(lambda tensor: tensor.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))


def _require(sample: dict[str, Any], suffix: str) -> bytes:
    if suffix not in sample:
        raise KeyError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no {suffix}")
    return fmt.member_bytes(sample[suffix])


def parse_label(data: bytes, num_classes: int | None = None) -> int:
    """A label member -> its class index, or ValueError for anything that is not one.

    `repa data build` writes the index in ASCII digits. `int()` alone would also take "-1", "+3"
    or "3_0" from damaged bytes, and a negative or too large index would stop training in the
    class embedding instead of being skipped here as a corrupt sample. `num_classes`: from the
    manifest, where there is one.
    """
    digits = data.strip()
    if not digits.isdigit():  # bytes.isdigit: ASCII digits only
        raise ValueError(f"label {data[:16]!r} is not a class index")
    label = int(digits)
    if num_classes is not None and label >= num_classes:
        raise ValueError(f"label {label} out of range: the manifest lists {num_classes} classes")
    return label


def caption_index(num_captions: int, key: str, entropy: Sequence[int] | None) -> int:
    """Which of a sample's captions to use: seeded by `entropy` (the training stream passes
    (seed, resume point, pass over the worker's shards): the epoch) and the sample's source key,
    so the draw does not depend on the shuffle order, the worker or the rank that reads the
    sample, and changes from one pass to the next. None: the first caption (evaluation)."""
    if entropy is None:
        return 0
    key_hash = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    state = np.random.SeedSequence([*entropy, key_hash]).generate_state(1, np.uint64)[0]
    return int(state % num_captions)


def _decode_caption(
    sample: dict[str, Any], key: str, with_text: bool, with_captions: bool, entropy: Sequence[int] | None
) -> tuple[Any, Any, str | None]:
    """(embeddings (L, D), mask (L,), caption) of the drawn caption; those not asked for are None."""
    captions = embeddings = masks = None
    if with_captions:
        captions = json.loads(_require(sample, fmt.CAPTIONS))
        if not isinstance(captions, list) or not captions:
            raise ValueError(f"sample {key}: {fmt.CAPTIONS} holds no captions")
    if with_text:
        embeddings = fmt.load_npy(_require(sample, fmt.TEXT))  # (K, L, D)
        masks = fmt.load_npy(_require(sample, fmt.TEXT_MASK))  # (K, L)
        if embeddings.ndim != 3 or masks.shape != embeddings.shape[:2] or not len(embeddings):
            raise ValueError(f"sample {key}: text {embeddings.shape} and mask {masks.shape} disagree")
    count = len(embeddings) if embeddings is not None else len(captions)
    if captions is not None and len(captions) != count:
        raise ValueError(f"sample {key}: {len(captions)} captions but {count} cached embeddings")
    index = caption_index(count, key, entropy)
    return (
        None if embeddings is None else embeddings[index],
        None if masks is None else masks[index],
        None if captions is None else str(captions[index]),
    )


def decode_sample(
    sample: dict[str, Any],
    *,
    flip: bool,
    with_latents: bool,
    with_features: bool,
    num_classes: int | None = None,
    with_images: bool = True,
    with_text: bool = False,
    with_captions: bool = False,
    caption_entropy: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Raw tar sample -> {image (H,W,3) uint8, label, moments, features, text (L,D), text_mask
    (L,), caption, key, flipped}; `caption_entropy` seeds the caption drawn (`caption_index`).

    A field not asked for is None and its member is not read (a deferred PNG stays in the file),
    so a sample whose PNG is damaged or missing is good for a step that reads only its caches."""
    image = None
    if with_images:  # mirrored as the cached flipped moments
        image = decode_png(_require(sample, fmt.IMAGE), flip=flip)
    label = parse_label(_require(sample, fmt.LABEL), num_classes)
    key = fmt.member_bytes(sample[fmt.SOURCE_KEY]).decode() if fmt.SOURCE_KEY in sample else sample["__key__"]
    moments = features = None
    if with_latents:
        moments = fmt.load_npy(_require(sample, fmt.LATENTS_FLIP if flip else fmt.LATENTS))
    if with_features:
        features = fmt.load_npy(_require(sample, fmt.FEATURES_FLIP if flip else fmt.FEATURES))
    text = text_mask = caption = None
    if with_text or with_captions:
        text, text_mask, caption = _decode_caption(sample, key, with_text, with_captions, caption_entropy)
    return dict(
        image=image,
        label=label,
        moments=moments,
        features=features,
        text=text,
        text_mask=text_mask,
        caption=caption,
        key=key,
        flipped=flip,
    )


# The decoded arrays a batch holds, and their dtypes in the batch.
_ARRAY_FIELDS = (
    ("image", torch.uint8),
    ("moments", torch.float32),
    ("features", torch.float16),
    ("text", torch.float16),
    ("text_mask", torch.bool),
)


class BatchBuilder:
    """Writes decoded samples row by row straight into (B, ...) tensors, then hands out a `Batch`.

    Each image is copied once, from the decoder into its row: no per-sample arrays to stack, and in
    a data-loader worker the tensors are a recycled shared-memory slot (see `_SlotRing`), so the
    batch is not copied again into fresh shared memory on its way to the training process.
    The first sample fixes the shapes; a later sample of another shape is refused (ValueError).
    The training stream checks shapes before (`_shape_problem`) and skips such samples.
    """

    def __init__(self, capacity: int, first: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None):
        self.capacity = capacity
        # images (B, H, W, 3) uint8, moments (B, 2C, h, w) float32, features (B, T, D) float16,
        # text (B, L, D) float16, text_mask (B, L) bool
        self.tensors = tensors if tensors is not None else self.allocate(capacity, first)
        self.arrays = {name: tensor.numpy() for name, tensor in self.tensors.items()}  # same memory
        self.row_shapes = {name: rows.shape[1:] for name, rows in self.arrays.items()}
        self.labels: list[int] = []
        self.keys: list[str] = []
        self.flipped: list[bool] = []
        self.captions: list[str] | None = [] if first.get("caption") is not None else None

    @staticmethod
    def allocate(capacity: int, first: dict[str, Any], share: bool = False) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, dtype in _ARRAY_FIELDS:
            if first.get(name) is not None:
                tensor = torch.empty((capacity, *first[name].shape), dtype=dtype)
                tensors[name] = tensor.share_memory_() if share else tensor
        return tensors

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, decoded: dict[str, Any]) -> None:
        row = len(self.keys)
        missing = [name for name in self.arrays if decoded[name] is None]
        problem = _shape_problem(decoded, dict(self.row_shapes))  # a copy: nothing new is recorded
        if missing or problem:
            raise ValueError(problem or f"sample {decoded['key']}: no {missing[0]}, which this batch holds")
        for name, rows in self.arrays.items():
            rows[row] = decoded[name]  # numpy casts float16/float32 as needed
        if self.captions is not None:
            if decoded["caption"] is None:
                raise ValueError(f"sample {decoded['key']}: no caption, which this batch holds")
            self.captions.append(decoded["caption"])
        self.labels.append(decoded["label"])
        self.keys.append(decoded["key"])
        self.flipped.append(decoded["flipped"])

    def batch(self, worker: int = 0, skipped: int = 0) -> Batch:
        rows = len(self.keys)
        tensors = {name: tensor[:rows] for name, tensor in self.tensors.items()}
        return Batch(
            # (B, H, W, 3) -> (B, 3, H, W) as a view: channels_last memory, no transposing copy.
            images=tensors["image"].permute(0, 3, 1, 2) if "image" in tensors else None,
            labels=torch.tensor(self.labels, dtype=torch.int64),
            moments=tensors.get("moments"),
            features=tensors.get("features"),
            keys=self.keys,
            flipped=torch.tensor(self.flipped, dtype=torch.bool),
            worker=worker,
            skipped=skipped,
            text=tensors.get("text"),
            text_mask=tensors.get("text_mask"),
            captions=self.captions,
        )


def collate(decoded: list[dict[str, Any]], worker: int = 0, skipped: int = 0) -> Batch:
    """Decoded samples -> one `Batch` (fresh tensors)."""
    builder = BatchBuilder(len(decoded), decoded[0])
    for sample in decoded:
        builder.add(sample)
    return builder.batch(worker=worker, skipped=skipped)


def stream_seed(seed: int, rank: int, worker: int, resume_batches: int) -> int:
    """The seed of one worker's generator: a hash of (seed, rank, worker, resume point)."""
    return int(np.random.SeedSequence([seed, rank, worker, resume_batches]).generate_state(1, np.uint64)[0])


# Members larger than this stay in local shard files until their sample is decoded
# (`shards.DeferredMember`): the shuffle buffer then holds headers and small fields only.
DEFER_OVER = 16 * 1024

# Batches a data-loader worker may have produced but the training process not yet copied: the
# DataLoader asks a worker for at most PREFETCH batches ahead, so RING_SLOTS = PREFETCH + 2 slots
# per worker are never all in use and a worker never waits for one (`_SlotRing.take`).
PREFETCH = 4
RING_SLOTS = PREFETCH + 2


@dataclass
class _SlotMessage:
    """What a worker sends for one batch: the batch's small fields and which shared slot holds it.

    The slot's tensors travel (as shared-memory handles) only with the slot's first batch; the
    training process keeps them and later messages name the slot by index.
    """

    local_worker: int  # the worker's index on this rank (its semaphore)
    slot: int
    tensors: dict[str, torch.Tensor] | None  # the slot's shared tensors, first use only
    labels: list[int]  # lists, not tensors: a tensor would be moved to new shared memory too
    keys: list[str]
    flipped: list[bool]
    worker: int
    skipped: int
    captions: list[str] | None = None


class _SlotRing:
    """A worker's RING_SLOTS shared-memory batch buffers, reused round-robin.

    Why: handing a fresh batch to the DataLoader makes torch move it into new shared memory, and
    on a 2-core machine that allocation and copy (page faults in /dev/shm) cost 7.7 ms per 64 x
    256 px batch against 0.5 ms to copy into a slot already touched (benchmarks/bench_stream_parts.py),
    over 10% of the batch's PNG decoding. Here each slot is allocated and faulted in once; the training
    process copies a batch out (into pinned memory on CUDA: the copy the DataLoader's pin-memory
    thread would make anyway) and releases the slot through this worker's semaphore. The batches
    of one worker arrive in order, so slot n % RING_SLOTS is free once the semaphore is acquired.
    """

    def __init__(self, semaphore: Any, local_worker: int):
        self.semaphore, self.local_worker = semaphore, local_worker
        self.slots: list[dict[str, torch.Tensor]] = []
        self.sent: set[int] = set()
        self.count = 0
        self.parent = os.getppid()

    def take(self, capacity: int, first: dict[str, Any]) -> tuple[BatchBuilder, int]:
        waited = 0.0
        while not self.semaphore.acquire(timeout=5.0):
            waited += 5.0
            if os.getppid() != self.parent:  # the training process is gone
                raise SystemExit(0)
            if waited >= 600:
                raise StreamError(
                    f"data-loader worker {self.local_worker}: no free batch slot after {waited:.0f} s; "
                    "the training process stopped copying batches out"
                )
        slot = self.count % RING_SLOTS
        self.count += 1
        if slot == len(self.slots):
            try:
                self.slots.append(BatchBuilder.allocate(capacity, first, share=True))
            except RuntimeError as exn:  # /dev/shm full: Docker gives containers 64 MB unless told
                raise StreamError(
                    f"data-loader worker {self.local_worker} could not allocate batch slot {slot + 1} of "
                    f"{RING_SLOTS} in shared memory ({exn}); give /dev/shm more room (docker run "
                    "--shm-size=...), or use fewer --num-workers or a smaller per-GPU batch"
                ) from exn
        return BatchBuilder(capacity, first, self.slots[slot]), slot

    def message(self, builder: BatchBuilder, slot: int, worker: int, skipped: int) -> _SlotMessage:
        first_use = slot not in self.sent
        self.sent.add(slot)
        return _SlotMessage(
            local_worker=self.local_worker,
            slot=slot,
            tensors=self.slots[slot] if first_use else None,
            labels=builder.labels,
            keys=builder.keys,
            flipped=builder.flipped,
            worker=worker,
            skipped=skipped,
            captions=builder.captions,
        )


def _shape_problem(decoded: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """None if the sample's arrays have the expected shapes (recording those not yet known)."""
    for name, _ in _ARRAY_FIELDS:
        array = decoded.get(name)
        if array is None:
            continue
        expected = shapes.setdefault(name, tuple(array.shape))
        if tuple(array.shape) != expected:
            return f"sample {decoded['key']}: {name} of shape {tuple(array.shape)}, expected {expected}"
    return None


class ShardStream(IterableDataset):
    """The per-worker pipeline behind `make_train_stream` (yields whole batches)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        resume_batches: int,
        shuffle_buffer: int,
        flip: bool,
        with_latents: bool,
        with_features: bool,
        with_images: bool = True,
        with_text: bool = False,
        with_captions: bool = False,
    ):
        super().__init__()
        self.urls = list(urls)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.resume_batches, self.shuffle_buffer = seed, resume_batches, shuffle_buffer
        self.flip, self.with_latents, self.with_features = flip, with_latents, with_features
        self.with_images, self.with_text, self.with_captions = with_images, with_text, with_captions
        self.skipped = 0  # per-worker counters (each worker process holds its own copy)
        self._raw_in_last_pass = 0
        self._consecutive_failures = 0
        self._last_error = ""
        self.slot_semaphores: list | None = None  # set by TrainStream while it starts workers
        self.defer_over = DEFER_OVER
        # Shapes every sample must have ("image" (H, W, 3), "moments", "features"), from the
        # manifest; a field missing here is fixed by the first sample a worker accepts.
        self.expected_shapes: dict[str, tuple[int, ...]] = {}
        # Samples in each shard (by file name), from the manifest: a shard that ends early
        # counts what it lost as skipped instead of losing it silently.
        self.expected_counts: dict[str, int] = {}
        self.num_classes: int | None = None  # from the manifest: labels outside it are corrupt
        self._short_shards_warned: set[str] = set()

    def _fields(self) -> tuple[bool, ...]:  # in the order of FIELDS
        return self.with_images, self.with_latents, self.with_features, self.with_text, self.with_captions

    def _skip(self, exn: Exception, where: str = "") -> bool:
        """webdataset-style handler: warn, count, continue. `where`: the sample, when known (tar
        errors name their shard themselves)."""
        self.skipped += 1
        self._last_error = f"{where}: {exn!r}" if where else repr(exn)
        if self.skipped <= 10 or self.skipped % 100 == 0:  # do not flood the log on a bad shard
            warnings.warn(
                f"data stream: skipping corrupt data ({self.skipped} so far): {self._last_error}",
                stacklevel=2,
            )
        return True

    def _count_shortfall(self, url: str, read: int, skipped: int) -> None:
        """A shard that ended before the manifest's count (truncated, often cleanly at a tar
        block boundary): its missing samples count as skipped, with one warning per shard."""
        expected = self.expected_counts.get(url.rsplit("/", 1)[-1])
        missing = expected - read - skipped if expected is not None else 0
        if missing <= 0:
            return
        self.skipped += missing
        if url not in self._short_shards_warned:
            self._short_shards_warned.add(url)
            warnings.warn(
                f"data stream: {url} ended after {read} of its {expected} samples (manifest); the "
                f"{missing} missing count as skipped on every pass (`repa data verify` checks shards)",
                stacklevel=2,
            )

    def _raw_samples(self, shards: list[str], rng: random.Random) -> Iterator[dict[str, Any]]:
        """Endless: each pass reads this worker's shards in a fresh seeded order."""
        for pass_index in itertools.count():
            order = shards[:]
            rng.shuffle(order)
            raw_in_pass = 0
            for url in order:
                read, skipped_before = 0, self.skipped
                for sample in fmt.iter_tar_samples(url, handler=self._skip, defer_over=self.defer_over):
                    read += 1
                    sample["__pass__"] = pass_index  # the epoch, for the caption draw
                    yield sample
                raw_in_pass += read
                self._count_shortfall(url, read, self.skipped - skipped_before)
            if raw_in_pass == 0:
                raise StreamError(
                    f"no readable samples in any of this worker's {len(shards)} shards "
                    f"(e.g. {shards[0]}); skipped {self.skipped}; last error: {self._last_error}"
                )
            self._raw_in_last_pass = raw_in_pass

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)  # fill first: the first batch waits for a full buffer
                continue
            index = rng.randrange(len(buffer))
            yield buffer[index]
            buffer[index] = sample
        rng.shuffle(buffer)
        yield from buffer

    def _decoded(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        for sample in samples:
            flip = self.flip and rng.random() < 0.5
            try:
                decoded = decode_sample(
                    sample,
                    flip=flip,
                    with_latents=self.with_latents,
                    with_features=self.with_features,
                    num_classes=self.num_classes,
                    with_images=self.with_images,
                    with_text=self.with_text,
                    with_captions=self.with_captions,
                    caption_entropy=(self.seed, self.resume_batches, sample["__pass__"]),
                )
            except Exception as exn:  # noqa: BLE001 (a corrupt sample must not kill the loader)
                self._skip(exn, where=f"sample {sample.get('__key__')} of {sample.get('__url__')}")
                self._consecutive_failures += 1
                # A whole pass (plus the buffer) without one good sample: nothing decodable is left.
                limit = self._raw_in_last_pass + self.shuffle_buffer
                if self._raw_in_last_pass and self._consecutive_failures > limit:
                    read = [name for name, on in zip(FIELDS, self._fields()) if on]
                    raise StreamError(
                        f"{self._consecutive_failures} samples in a row failed to decode (a whole "
                        f"pass over this worker's shards, reading {', '.join(['labels', *read])}): "
                        f"nothing decodable left; last error: {self._last_error}"
                    ) from exn
                continue
            self._consecutive_failures = 0
            yield decoded

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        global_worker = self.rank * num_workers + worker
        shards = self.urls[global_worker :: self.world_size * num_workers]
        if not shards:  # make_train_stream checks this up front; guard direct use too
            raise StreamError(f"worker {global_worker} has no shard: {len(self.urls)} shards are too few")
        rng = random.Random(stream_seed(self.seed, self.rank, worker, self.resume_batches))
        self.skipped, self._consecutive_failures, self._raw_in_last_pass = 0, 0, 0
        ring = None
        if info is not None and self.slot_semaphores is not None:
            ring = _SlotRing(self.slot_semaphores[worker], worker)
        builder, slot = None, None
        shapes = dict(self.expected_shapes)
        shape_skips = shape_accepted = 0
        for decoded in self._decoded(self._shuffled(self._raw_samples(shards, rng), rng), rng):
            problem = _shape_problem(decoded, shapes)
            if problem is not None:  # a sample of another size than the rest: skip it
                self._skip(ValueError(problem))
                shape_skips += 1
                if shape_skips > 100 and shape_skips > 10 * shape_accepted:
                    raise StreamError(
                        f"{shape_skips} samples skipped for their shape against {shape_accepted} accepted "
                        f"(last: {problem}); the expected size comes from the manifest, or without one "
                        "from the first sample: rebuild the shards at one resolution with `repa data build`"
                    )
                continue
            shape_accepted += 1
            if builder is None:
                builder, slot = (
                    ring.take(self.batch_size, decoded)
                    if ring
                    else (BatchBuilder(self.batch_size, decoded), None)
                )
            builder.add(decoded)
            if len(builder) == self.batch_size:
                if ring is None:
                    yield builder.batch(worker=global_worker, skipped=self.skipped)
                else:
                    yield ring.message(builder, slot, worker=global_worker, skipped=self.skipped)
                builder = None


class _RecycledBuffers:
    """CPU memory for batches copied out of the worker slots, handed out again once unreferenced.

    Why: copying a 50 MB batch (64 x 512 px) into fresh memory took 22 ms, into memory already
    touched 2.4 ms (benchmarks/bench_stream_parts.py), in the training process, on cores the
    workers need. How a buffer is known to be free, with public API only: each batch tensor is
    `torch.from_numpy` of a new numpy view of a pooled buffer, which torch keeps alive exactly as
    long as the tensor's memory is referenced (by the batch, a view of it, a numpy array over it
    or its storage object); a finalizer on that view puts the buffer back when it goes. A batch
    moved to shared memory in place (sent to another process) lets go of its buffer then.
    """

    KEEP = 3  # buffers per field: enough for a consumer that holds one or two batches

    def __init__(self) -> None:
        self.idle: dict[str, list[np.ndarray]] = {}  # flat uint8 buffers nothing refers to
        self.owned: dict[str, int] = {}  # buffers of each field in the pool, idle or handed out

    def take(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        idle = self.idle.setdefault(name, [])
        buffer = next((candidate for candidate in idle if candidate.nbytes == nbytes), None)
        if buffer is not None:
            idle.remove(buffer)
        elif self.owned.get(name, 0) < self.KEEP:
            buffer = np.empty(nbytes, np.uint8)
            self.owned[name] = self.owned.get(name, 0) + 1
        else:  # the consumer holds KEEP batches already: fresh memory, not pooled
            return torch.empty(shape, dtype=dtype)
        lease = buffer.view(np_dtype).reshape(shape)  # a new array object, held only by torch
        weakref.finalize(lease, idle.append, buffer)
        return torch.from_numpy(lease)


def _leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """DataLoader worker start-up: a scheduler's SIGTERM (torchrun and Slurm signal every process
    of the job), a terminal's Ctrl-C and SIGUSR1 are the rank's to act on; a worker that died of
    them would take the rank down before it could save. (A job's processes may get SIGTERM twice:
    from the scheduler and from torchrun forwarding it.) The rank ends its workers through the
    DataLoader, and kills any that do not end (`TrainStream`); on Linux a worker also dies with
    its rank instead of outliving it."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


@dataclass
class TrainStream:
    """Iterable of `Batch` for one rank; see the module docstring for its guarantees.

    Iterating again continues the stream (fresh generators seeded from `batches_seen`), so
    `state_dict()` / `resume_batches` is all a checkpoint needs.
    """

    dataset: ShardStream
    batch_size_per_rank: int
    num_workers: int
    pin_memory: bool
    num_batches: int | None = None
    batches_seen: int = 0
    _skipped_per_worker: dict[int, int] = field(default_factory=dict)
    _skipped_before: int = 0

    @property
    def samples_seen(self) -> int:
        """Exact number of samples this rank has consumed (including before a resume)."""
        return self.batches_seen * self.batch_size_per_rank

    @property
    def num_skipped(self) -> int:
        """Corrupt samples/shards skipped by this rank's workers (log it with the training metrics)."""
        return self._skipped_before + sum(self._skipped_per_worker.values())

    def state_dict(self) -> dict[str, int]:
        return {"batches_seen": self.batches_seen, "num_skipped": self.num_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches_seen = int(state["batches_seen"])
        self._skipped_before, self._skipped_per_worker = int(state.get("num_skipped", 0)), {}

    def __iter__(self) -> Iterator[Batch]:
        self._skipped_before = self.num_skipped
        self._skipped_per_worker = {}
        self.dataset.resume_batches = self.batches_seen
        context = multiprocessing.get_context() if self.num_workers > 0 else None
        semaphores = [context.Semaphore(RING_SLOTS) for _ in range(self.num_workers)] if context else []
        self.dataset.slot_semaphores = semaphores or None
        try:
            loader = DataLoader(
                self.dataset,
                batch_size=None,  # the workers batch
                num_workers=self.num_workers,
                # With workers, batches are copied out of their slots into pinned memory here.
                pin_memory=self.pin_memory and self.num_workers == 0,
                prefetch_factor=PREFETCH if self.num_workers > 0 else None,
                multiprocessing_context=context,
                worker_init_fn=_leave_stop_signals_to_the_rank if self.num_workers > 0 else None,
            )
            batches = iter(loader)  # starts the workers, which take the semaphores with them
        finally:
            self.dataset.slot_semaphores = None
        slot_tensors: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        recycled = _RecycledBuffers()
        try:
            # islice stops without asking for one more batch: reading past the last one would
            # decode (and warn about) samples that the stream's counters never report.
            for item in itertools.islice(batches, self.num_batches):
                batch = (
                    item
                    if isinstance(item, Batch)
                    else self._copy_out(item, slot_tensors, semaphores, recycled)
                )
                self._skipped_per_worker[batch.worker] = batch.skipped
                self.batches_seen += 1
                yield batch
        finally:
            # Stop the workers now: after a worker error the traceback keeps the DataLoader
            # iterator alive, and its shutdown at garbage collection waits seconds per worker.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            # a worker that ignored the shutdown (stuck in a read) and its terminate() (workers
            # ignore SIGTERM) would hold the process at exit
            for worker in getattr(batches, "_workers", []):
                if worker.is_alive():
                    worker.kill()

    def _copy_out(
        self,
        message: _SlotMessage,
        slot_tensors: dict[tuple[int, int], dict[str, torch.Tensor]],
        semaphores: list,
        recycled: _RecycledBuffers,
    ) -> Batch:
        """Copy a batch out of its worker's shared slot (pinned memory on CUDA), then free the slot."""
        key = (message.local_worker, message.slot)
        if message.tensors is not None:
            slot_tensors[key] = message.tensors
        rows = len(message.keys)
        copies = {}
        for name, shared in slot_tensors[key].items():
            source = shared[:rows]
            if self.pin_memory:
                copy = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)  # cached by torch
            else:
                copy = recycled.take(name, source.shape, source.dtype)
            # numpy's single-threaded memcpy: torch's copy_ spreads over intra-op threads on cores
            # the workers are using (50 MB with both cores busy: 8.0 ms vs 2.4 ms, bench_stream_parts.py).
            np.copyto(copy.numpy(), source.numpy())
            copies[name] = copy
        semaphores[message.local_worker].release()
        labels = torch.tensor(message.labels, dtype=torch.int64, pin_memory=self.pin_memory)
        flipped = torch.tensor(message.flipped, dtype=torch.bool, pin_memory=self.pin_memory)
        return Batch(
            # a channels_last view, as BatchBuilder.batch makes
            images=copies["image"].permute(0, 3, 1, 2) if "image" in copies else None,
            labels=labels,
            moments=copies.get("moments"),
            features=copies.get("features"),
            keys=message.keys,
            flipped=flipped,
            worker=message.worker,
            skipped=message.skipped,
            text=copies.get("text"),
            text_mask=copies.get("text_mask"),
            captions=message.captions,
        )


def _check_manifest(
    shards: str | Sequence[str],
    *,
    flip: bool,
    with_latents: bool,
    with_features: bool,
    with_text: bool = False,
    with_captions: bool = False,
) -> tuple[dict[str, tuple[int, ...]], dict[str, int], int | None]:
    """Fail at start-up when the manifest says the shards lack a requested cache; return the
    shapes it records for images, moments and features, each shard's sample count by file
    name, and the number of classes (empty and None without a readable manifest)."""
    if not isinstance(shards, str):
        return {}, {}, None
    manifest_path = fmt.locate_manifest(shards)
    if manifest_path is None:
        return {}, {}, None
    try:
        manifest = fmt.read_manifest(manifest_path)
        fields = manifest["fields"]
    except (OSError, ValueError, KeyError):
        return {}, {}, None  # no readable manifest: per-sample checks still apply
    if with_latents and "latents" not in fields:
        raise StreamError(f"{shards}: no cached latents; rebuild with `repa data build --cache-latents NAME`")
    if with_features and "features" not in fields:
        raise StreamError(
            f"{shards}: no cached features; rebuild with `repa data build --cache-features NAME`"
        )
    if with_features and flip and "features_flipped" not in fields:
        raise StreamError(
            f"{shards}: flip=True needs features of the flipped images; rebuild with "
            "`--cache-flipped-features` or train without flips"
        )
    if with_captions and "captions" not in fields:
        raise StreamError(
            f"{shards}: no captions; build from captioned data (`repa data build --captions FILE.json`, "
            "or tar shards with txt/json captions)"
        )
    if with_text and "text" not in fields:
        raise StreamError(
            f"{shards}: no cached text embeddings; rebuild with `repa data build --cache-text NAME`"
        )
    shapes = {}
    if isinstance(manifest.get("resolution"), int):
        shapes["image"] = (manifest["resolution"], manifest["resolution"], 3)
    for name, key in (("moments", "latent_shape"), ("features", "feature_shape"), ("text", "text_shape")):
        if manifest.get(key):
            shapes[name] = tuple(manifest[key])
    if "text" in shapes:
        shapes["text_mask"] = shapes["text"][:1]
    counts = {
        entry["name"]: int(entry["num_samples"])
        for entry in manifest.get("shards") or []
        if isinstance(entry, dict) and "name" in entry and "num_samples" in entry
    }
    num_classes = manifest.get("num_classes")
    return shapes, counts, num_classes if isinstance(num_classes, int) and num_classes > 0 else None


def make_train_stream(
    shards: str | Sequence[str],
    *,
    batch_size_per_rank: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
    seed: int = 0,
    resume_batches: int = 0,
    shuffle_buffer: int = 1000,
    flip: bool = False,
    with_latents: bool = False,
    with_features: bool = False,
    fields: Collection[str] | None = None,
    pin_memory: bool | None = None,
    num_batches: int | None = None,
) -> TrainStream:
    """The training stream of one rank (global rank `rank` of `world_size`, nodes x processes).

    `shards`: a brace pattern, `::`-joined patterns, a list of URLs, a folder with a manifest.
    `fields`: the batch fields to read, of `FIELDS` ("images", "latents", "features", "text",
    "captions"; labels and keys always come): what the training method's step reads
    (`TrainingMethod.batch_fields`).
    A field left out is None in every batch and its members are never read or decoded. None:
    images, plus latents and features as `with_latents` and `with_features` say (which must stay
    False when `fields` is given).
    `pin_memory=None` pins when CUDA is available. `num_batches`: stop after that many batches
    (the same on every rank); None streams forever. `resume_batches`: batches this rank consumed
    before (see the module docstring for what a resume guarantees).
    """
    if batch_size_per_rank <= 0:
        raise ValueError(f"batch_size_per_rank must be positive, got {batch_size_per_rank}")
    if fields is None:
        cached = (("latents", with_latents), ("features", with_features))
        fields = {"images"} | {name for name, wanted in cached if wanted}
    elif with_latents or with_features:
        raise ValueError("pass `fields` or with_latents / with_features, not both")
    fields = set(fields)
    unknown = fields - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown batch field(s) {sorted(unknown)}: the stream reads {', '.join(FIELDS)}")
    with_images, with_latents, with_features, with_text, with_captions = (name in fields for name in FIELDS)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    urls = fmt.expand_shard_urls(shards)
    fmt.check_local_shards(urls)  # a typo in the path is not "too few shards"
    if len(urls) < world_size:
        raise ValueError(
            f"{len(urls)} shard(s) for {world_size} rank(s): need at least {world_size} shards so that "
            f"every rank has its own; rebuild with a smaller --shard-size"
        )
    # every worker reads its own shards: with fewer shards than readers, fewer workers (a small
    # data set must not stop a run; the choice depends only on the shard count, so a resume
    # makes the same one)
    workers_that_fit = len(urls) // world_size
    if num_workers > workers_that_fit:
        warnings.warn(
            f"{len(urls)} shard(s) for {world_size} rank(s) x {num_workers} data-loader workers: using "
            f"{workers_that_fit} worker(s) per rank so that every worker has its own shards (rebuild "
            f"with a smaller --shard-size to use {num_workers})",
            stacklevel=2,
        )
        num_workers = workers_that_fit
    shapes, counts, num_classes = _check_manifest(
        shards,
        flip=flip,
        with_latents=with_latents,
        with_features=with_features,
        with_text=with_text,
        with_captions=with_captions,
    )
    dataset = ShardStream(
        urls,
        batch_size=batch_size_per_rank,
        rank=rank,
        world_size=world_size,
        seed=seed,
        resume_batches=resume_batches,
        shuffle_buffer=shuffle_buffer,
        flip=flip,
        with_latents=with_latents,
        with_features=with_features,
        with_images=with_images,
        with_text=with_text,
        with_captions=with_captions,
    )
    dataset.expected_shapes, dataset.expected_counts, dataset.num_classes = shapes, counts, num_classes
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    elif pin_memory and not torch.cuda.is_available():
        warnings.warn("pin_memory=True without CUDA: batches are not pinned", stacklevel=2)
        pin_memory = False
    return TrainStream(
        dataset,
        batch_size_per_rank=batch_size_per_rank,
        num_workers=num_workers,
        pin_memory=pin_memory,
        num_batches=num_batches,
        batches_seen=resume_batches,
    )


def iter_eval_batches(
    shards: str | Sequence[str],
    *,
    batch_size: int,
    with_latents: bool = False,
    with_features: bool = False,
    rank: int = 0,
    world_size: int = 1,
    with_images: bool = True,
    with_text: bool = False,
    with_captions: bool = False,
) -> Iterator[Batch]:
    """Every sample exactly once, in shard order (no resampling, shuffling or flipping); of a
    captioned sample, its first caption (and that caption's cached text).

    For FID reference statistics and latent statistics. With several ranks, rank r reads shards
    r, r + world_size, ...; together they cover each sample once. Errors are raised, not skipped:
    a reference set must not silently lose samples. The last batch may be smaller.
    """
    urls = fmt.expand_shard_urls(shards)[rank::world_size]
    pending: list[dict[str, Any]] = []
    for url in urls:
        for sample in fmt.iter_tar_samples(url):
            pending.append(
                decode_sample(
                    sample,
                    flip=False,
                    with_latents=with_latents,
                    with_features=with_features,
                    with_images=with_images,
                    with_text=with_text,
                    with_captions=with_captions,
                )
            )
            if len(pending) == batch_size:
                yield collate(pending)
                pending = []
    if pending:
        yield collate(pending)
