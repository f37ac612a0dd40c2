"""File helpers shared by data building, training and evaluation: hashing and atomic writes.

Checksums of checkpoint files (repa.runs) are BLAKE2b with a 256-bit digest, the same digest
as `b2sum -l 256 FILE`; a writer that takes a file object hashes while it writes
(`HashingWriter`), anything else is hashed by streaming the file in 4 MiB blocks.

Atomic writes: a file appears under its name complete or not at all. The data goes to a hidden
sibling `.NAME.tmp-PID` (same folder, so the rename cannot cross file systems), is fsynced,
renamed over the target, and the folder is fsynced so the rename itself survives a power cut.
The temporary name ends in `.tmp-PID`, not in the target's suffix, so readers that list a
folder by suffix (`*.tar`, `*.png`) never pick up a half-written file; writers that choose
their format by suffix (np.savez appends `.npz`, PIL) are given an open file instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


CHECKSUM = "blake2b-256"  # the name checkpoints record next to their digests
_BLOCK = 1 << 22


def _new_checksum():
    return hashlib.blake2b(digest_size=32)


def file_checksum(path: str | os.PathLike) -> str:
    """Hex BLAKE2b-256 of a file (`b2sum -l 256`), read in 4 MiB blocks: memory stays flat."""
    digest = _new_checksum()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def bytes_checksum(data: bytes) -> str:
    """Hex BLAKE2b-256 of bytes in memory (equal to file_checksum of a file holding them)."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


class HashingWriter:
    """A file opened for binary writing that hashes every byte written through it, so a save
    costs no second read:

        with HashingWriter(path) as out:
            torch.save(obj, out)       # torch writes a file object sequentially
        out.hexdigest()                # == file_checksum(path)

    Only sequential writers may use it (no seek/tell): the digest is of the bytes in order.
    """

    def __init__(self, path: str | os.PathLike):
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close() / the with block)
        self._digest = _new_checksum()

    def write(self, data) -> int:
        self._digest.update(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def temporary_path(path: str | os.PathLike) -> Path:
    """Where this process writes `path` before renaming it into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files of `path` left by interrupted writers (any process)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:  # fsync flushes the file, whichever descriptor asks
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path`, on an
    exception it is removed and `path` is left as it was.

        with atomic_path(out) as tmp:
            torch.save(obj, tmp)

    durable=False skips the fsyncs: the file is still never seen half-written after a kill, but
    may be lost in a power cut (for files cheap to make again, where an fsync each would dominate).
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the writer or the rename failed


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write `data` to `path` atomically (see the module docstring); returns the path."""
    path = Path(path)
    with atomic_path(path, durable=durable) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return path
