"""The shard format shared by the writer (build.py) and the readers (stream.py): names and helpers.

A dataset is a folder of tar shards `PREFIX-000000.tar ...` plus `manifest.json`. Each sample is a
group of tar members with the same basename (the webdataset convention):

    000000042.png              the image, RGB, centre-cropped to the dataset resolution (lossless)
    000000042.cls              class index, ASCII decimal
    000000042.key.txt          the source key (e.g. `n01440764/n01440764_10026.JPEG`)
    000000042.latent.npy       optional: VAE posterior moments cat(mean, std), (2C, h, w)
    000000042.latent_flip.npy  optional: the same for the horizontally flipped image
    000000042.features.npy     optional: encoder target tokens (T, D), float16
    000000042.features_flip.npy  optional: the same for the flipped image
    000000042.captions.json    optional: every caption of the image, a JSON list of K strings
    000000042.text.npy         optional: the captions' text-encoder token embeddings (K, L, D), float16
    000000042.text_mask.npy    optional: their attention masks (K, L), bool (True: a caption token)

With cached text, the folder also holds the empty caption's embedding and mask (the null caption
for classifier-free guidance): `null_text.npy` (L, D) float16 and `null_text_mask.npy` (L,) bool.

Shard URLs may be local paths, brace patterns (`shards/train-{000000..000012}.tar`), a folder
holding a manifest, `pipe:COMMAND` (webdataset's convention) or any URL fsspec can open
(`s3://`, `gs://`, `https://`, ...).
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import braceexpand

IMAGE = "png"
LABEL = "cls"
SOURCE_KEY = "key.txt"
LATENTS = "latent.npy"
LATENTS_FLIP = "latent_flip.npy"
FEATURES = "features.npy"
FEATURES_FLIP = "features_flip.npy"
CAPTIONS = "captions.json"
TEXT = "text.npy"
TEXT_MASK = "text_mask.npy"
NULL_TEXT = "null_text.npy"
NULL_TEXT_MASK = "null_text_mask.npy"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "repa-shards/1"

_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def brace_pattern(prefix: str, num_shards: int) -> str:
    """`train-{000000..000012}.tar` for 13 shards (a single name for one shard)."""
    if num_shards == 1:
        return shard_name(prefix, 0)
    return f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or (bool(_URL_SCHEME.match(url)) and not url.startswith("file://"))


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def open_url(url: str) -> BinaryIO:
    """Open a shard or manifest for binary reading: local path, `pipe:CMD`, or any fsspec URL."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen_pipe

        return gopen_pipe(url, mode="rb")
    if _URL_SCHEME.match(url) and not url.startswith("file://"):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(_local_path(url), "rb", buffering=1 << 20)


def locate_manifest(shards: str) -> str | None:
    """The manifest belonging to a shard spec (folder, manifest path, or pattern), if any exists."""
    if shards.endswith(".json"):
        return shards
    if shards.startswith("pipe:"):
        return None
    if not is_remote(shards) and os.path.isdir(_local_path(shards)):
        return os.path.join(_local_path(shards), MANIFEST_NAME)
    first = next(iter(braceexpand.braceexpand(shards.split("::")[0])))
    candidate = first.rsplit("/", 1)[0] + "/" + MANIFEST_NAME if "/" in first else MANIFEST_NAME
    if is_remote(candidate):
        return candidate
    return candidate if os.path.exists(_local_path(candidate)) else None


def read_manifest(path: str) -> dict[str, Any]:
    with open_url(path) as handle:
        manifest = json.load(handle)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a repa shard manifest (format {manifest.get('format')!r})")
    return manifest


def read_null_text(shards: str) -> tuple[Any, Any]:
    """The null caption stored beside a manifest by `repa data build --cache-text`: the empty
    caption's embeddings (L, D) float16 and mask (L,) bool."""
    manifest_path = locate_manifest(shards)
    manifest = read_manifest(manifest_path) if manifest_path else {}
    names = manifest.get("null_text")
    if not names:
        raise FileNotFoundError(
            f"{shards}: no cached null caption; rebuild with `repa data build --cache-text NAME`"
        )
    folder = manifest_path.rsplit("/", 1)[0] if "/" in manifest_path else "."
    arrays = []
    for name in (names["embeddings"], names["mask"]):
        with open_url(f"{folder}/{name}") as handle:
            arrays.append(load_npy(handle.read()))
    return arrays[0], arrays[1]


def expand_shard_urls(shards: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into a list of URLs.

    Accepts a list of URLs, a brace pattern, several patterns joined by `::`, a folder holding a
    manifest (its shards, in order) or a manifest path.
    """
    if not isinstance(shards, str):
        urls: list[str] = []
        for spec in shards:
            urls.extend(expand_shard_urls(spec))
        return urls
    if shards.endswith(".json") or (not is_remote(shards) and os.path.isdir(_local_path(shards))):
        manifest_path = locate_manifest(shards)
        if manifest_path is None or (not is_remote(manifest_path) and not os.path.exists(manifest_path)):
            raise FileNotFoundError(f"{shards}: no {MANIFEST_NAME} there; pass a shard pattern instead")
        manifest = read_manifest(manifest_path)
        folder = manifest_path.rsplit("/", 1)[0] if "/" in manifest_path else "."
        return [f"{folder}/{entry['name']}" for entry in manifest["shards"]]
    urls = []
    for pattern in shards.split("::"):
        urls.extend(braceexpand.braceexpand(pattern))
    return urls


def check_local_shards(urls: Sequence[str], hint: str = "") -> None:
    """Missing local shard files are a start-up error, not a stream of skip warnings later.

    (A FIFO or device counts as present: it is streamed. Remote URLs are not checked here.)
    """
    local = [_local_path(url) for url in urls if not is_remote(url)]
    missing = [path for path in local if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} training shards do not exist, e.g. {missing[0]}{hint}"
        )


class ShardFormatError(ValueError):
    """A shard is truncated or its tar headers are damaged."""


class LocalShard:
    """An open local shard file, closed when the last `DeferredMember` referring to it is gone."""

    open_count = 0  # in this process: deferral stops above MAX_OPEN, so a shuffle buffer
    MAX_OPEN = 64  # spread over many small shards cannot run the process out of descriptors

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        LocalShard.open_count += 1
        self.size = os.fstat(self.fd).st_size

    def __del__(self) -> None:
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)
            LocalShard.open_count -= 1


class DeferredMember:
    """The data of a large tar member left in its local shard until `read()`.

    Why: the training stream's shuffle buffer holds a thousand samples per worker. Holding their
    PNG bytes (118 MB per worker at 256 px, four times that at 512 px) made every read land in
    memory that had left the CPU caches: 51 against 32 us per 256 px sample with a buffer of one
    (benchmarks/bench_stream_parts.py); and of the
    two cached latents (plain and flipped) only one is ever used. Reading at decode time puts the
    bytes in cache just before the decoder needs them.
    """

    __slots__ = ("shard", "offset", "size")

    def __init__(self, shard: LocalShard, offset: int, size: int):
        self.shard, self.offset, self.size = shard, offset, size

    def __len__(self) -> int:
        return self.size

    def read(self) -> bytes:
        data = os.pread(self.shard.fd, self.size, self.offset)
        if len(data) != self.size:  # the file shrank since its headers were read
            where = f"{self.shard.path}: member at byte {self.offset}"
            raise ShardFormatError(f"{where} truncated ({len(data)} of {self.size} bytes)")
        return data


def member_bytes(data: bytes | DeferredMember) -> bytes:
    """The bytes of a member as `iter_tar_samples` gave it (read now if it was deferred)."""
    return data.read() if isinstance(data, DeferredMember) else data


_ZERO_BLOCK = bytes(512)


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    while len(data) < size:  # pipes and some remote files return short reads
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_sum_mod_65521(header: bytes) -> int:
    """The tar header checksum (byte sum with the checksum field read as 8 spaces) modulo 65521.

    zlib's Adler-32 keeps 1 + (byte sum) mod 65521 in its low 16 bits, computed in C: three calls
    take 0.36 us against 2.09 us for Python's `sum` over the 512 bytes (five headers per sample;
    benchmarks/bench_stream_parts.py). A header sum is at most 512 * 255 = 130560 < 2 * 65521, so a damaged
    header passes only if its byte sum changed by exactly 65521.
    """
    running = zlib.adler32(header[:148])
    running = zlib.adler32(b"        ", running)
    return ((zlib.adler32(header[156:], running) & 0xFFFF) - 1) % 65521


def iter_tar_members(
    stream: BinaryIO, defer_over: int | None = None, shard: LocalShard | None = None
) -> Iterator[tuple[str, bytes | DeferredMember]]:
    """(name, data) of each regular file in a tar stream (ustar, pax and GNU long names).

    A small sequential reader instead of Python's `tarfile` (which webdataset uses): profiling the
    stream at 32 px showed tarfile's header parsing costing more than the PNG decoding itself.
    Header checksums are verified; truncation raises ShardFormatError.

    With `shard` (a local file, `stream` reading it from the start) and `defer_over`, regular
    members larger than `defer_over` bytes are skipped with a seek and yielded as a
    `DeferredMember` to read later (their extent is checked against the file size now).
    """
    long_name: str | None = None
    position = 0  # of the next header, when deferring
    read = stream.read  # the fast path reads each part in one call; _read_exact completes short reads
    while True:
        header = read(512)
        if not header:
            return  # end of file without the end-of-archive blocks: accepted, as tarfile does
        if len(header) < 512:
            header += _read_exact(stream, 512 - len(header))
            if len(header) < 512:
                raise ShardFormatError(f"truncated tar header ({len(header)} of 512 bytes)")
        if header == _ZERO_BLOCK:
            return  # end-of-archive block
        try:  # fast path: the usual zero-padded octal fields
            stored, size = int(header[148:154], 8), int(header[124:135], 8)
        except ValueError:
            stored, size = _octal(header[148:156]), _octal(header[124:136])
        if stored % 65521 != _header_sum_mod_65521(header):
            raise ShardFormatError("tar header checksum mismatch (damaged shard)")
        padding = -size % 512
        kind = header[156:157]
        if shard is not None and defer_over is not None and size > defer_over and kind in (b"0", b"\0"):
            data_start = position + 512
            position = data_start + size + padding
            if position > shard.size:  # the data or its padding runs past the end of the file
                if data_start + size > shard.size:
                    raise ShardFormatError(
                        f"truncated tar member ({shard.size - data_start} of {size} bytes)"
                    )
                raise ShardFormatError("truncated tar padding")
            stream.seek(position)
            yield _member_name(header, long_name), DeferredMember(shard, data_start, size)
            long_name = None
            continue
        position += 512 + size + padding
        data = read(size)
        if len(data) < size:
            data += _read_exact(stream, size - len(data))
            if len(data) < size:
                raise ShardFormatError(f"truncated tar member ({len(data)} of {size} bytes)")
        if padding:
            got = len(read(padding))
            if got < padding and got + len(_read_exact(stream, padding - got)) < padding:
                raise ShardFormatError("truncated tar padding")
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode()
            continue
        if kind in (b"x", b"X"):  # pax extended header: take its path, if any
            for record in data.decode("utf-8", "replace").splitlines():
                key_value = record.split(" ", 1)[-1]
                if key_value.startswith("path="):
                    long_name = key_value[len("path=") :]
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue  # directories, links, global headers
        yield _member_name(header, long_name), data
        long_name = None


def _member_name(header: bytes, long_name: str | None) -> str:
    if long_name is not None:  # from a preceding GNU long-name or pax header
        return long_name
    name = header[:100].split(b"\0", 1)[0].decode()
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return prefix.decode() + "/" + name if prefix else name


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    directory, _, basename = name.rpartition("/")
    stem, _, suffix = basename.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix.lower()


def iter_tar_samples(
    url: str, handler: Callable[[Exception], bool] | None = None, defer_over: int | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the samples of one shard as dicts {"__key__", "__url__", suffix: bytes, ...}.

    Consecutive members with the same key form a sample (the webdataset convention). With
    `handler`, an error (unreadable, truncated or damaged shard) is passed to it and the rest of
    the shard is skipped; the sample being assembled at that point is dropped, so no sample with
    missing fields comes out. Without a handler, errors propagate.

    `defer_over`: in local shards, members larger than this many bytes come as `DeferredMember`
    (read them with `member_bytes`); remote shards are streamed and always give bytes.
    """
    current: dict[str, Any] | None = None
    try:
        shard = None
        if (
            defer_over is not None
            and not is_remote(url)
            and LocalShard.open_count < LocalShard.MAX_OPEN
            and stat.S_ISREG(os.stat(_local_path(url)).st_mode)  # a FIFO or device: no offsets
        ):
            shard = LocalShard(_local_path(url))
        if shard is not None:
            # A small buffer: reading a header fills it, and a deferred member is skipped by a seek.
            stream = open(shard.fd, "rb", buffering=1 << 14, closefd=False)  # noqa: SIM115 (with below)
        else:
            stream = open_url(url)
        with stream:
            for name, data in iter_tar_members(stream, defer_over, shard):
                key, suffix = split_key(name)
                if not suffix or key.startswith("__"):
                    continue  # webdataset metadata members
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[suffix] = data
        if current is not None:
            yield current
    except (OSError, EOFError, ValueError) as exn:
        exn.args = (*exn.args, f"shard {url}")
        if handler is None:
            raise
        handler(exn)


def npy_bytes(array: Any) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[Any, tuple[int, ...], bool]] = {}


def load_npy(data: bytes) -> Any:
    """Parse .npy bytes without copying; headers are parsed once and cached (np.load parses each
    header with a Python literal evaluator, which cost more than the copy for small arrays)."""
    import numpy as np

    if data[:6] != _NPY_MAGIC:
        raise ValueError("not .npy data")
    if data[6] == 1:
        header_length, start = int.from_bytes(data[8:10], "little"), 10
    else:
        header_length, start = int.from_bytes(data[8:12], "little"), 12
    header = data[start : start + header_length]
    parsed = _npy_headers.get(header)
    if parsed is None:
        stream = io.BytesIO(data[8:])  # positioned after the magic and version bytes
        read_header = (
            np.lib.format.read_array_header_1_0 if data[6] == 1 else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(stream)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        parsed = (dtype, shape, fortran_order)
        if len(_npy_headers) < 256:
            _npy_headers[header] = parsed
    dtype, shape, fortran_order = parsed
    count = int(np.prod(shape))
    offset = start + header_length
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f".npy data holds {len(data) - offset} bytes, its header says {count * dtype.itemsize}"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)
