"""The ADM evaluator's sample file: a `.npz` whose `arr_0` is uint8 (N, H, W, 3), streamed.

`np.savez` needs the whole array in memory (50,000 images at 256 px are 9.8 GB); here the `.npy`
member is written chunk by chunk into the zip (stored, uncompressed, ZIP64, as np.savez writes
it), to a temporary name that is renamed into place only when complete. Reading streams rows
the same way, so reference sets and sample files of any size are processed batch by batch.
`np.load(path)["arr_0"]` reads these files as usual.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from repa.utils.files import atomic_path


def write_npz_streaming(
    path: str | os.PathLike,
    shape: tuple[int, ...],
    chunks: Iterable[np.ndarray],
    *,
    dtype: np.dtype = np.uint8,
    name: str = "arr_0",
    extra: dict[str, np.ndarray] | Callable[[], dict[str, np.ndarray]] | None = None,
) -> Path:
    """Write `chunks` (consecutive row blocks of an array of `shape`) as member `name` of a .npz.

    The file appears at `path` atomically (temporary file, fsync, rename). `extra`: small arrays
    stored as further members (e.g. labels), or a function returning them, called after the
    chunks are consumed. Raises if the chunks do not fill `shape` exactly.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    row_shape = tuple(shape[1:])
    rows_written = 0
    with (
        atomic_path(path) as tmp,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
    ):
        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            header = {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": shape,
            }
            np.lib.format.write_array_header_2_0(member, header)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk)
                if chunk.dtype != dtype or tuple(chunk.shape[1:]) != row_shape:
                    raise ValueError(
                        f"chunk of {chunk.dtype} {chunk.shape} does not fit an array of {dtype} {shape}"
                    )
                member.write(chunk.tobytes())
                rows_written += chunk.shape[0]
        if rows_written != shape[0]:
            raise ValueError(f"wrote {rows_written} rows, expected {shape[0]}")
        extra = extra() if callable(extra) else extra
        for key, value in (extra or {}).items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(value), allow_pickle=False)
    return path


def npz_members(path: str | os.PathLike) -> list[str]:
    """Array names stored in a .npz (without the .npy suffix)."""
    with zipfile.ZipFile(path) as archive:
        return [name.removesuffix(".npy") for name in archive.namelist()]


def npz_array_shape(path: str | os.PathLike, name: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one member, read from its header only."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
        shape, _, dtype = _read_header(member)
    return shape, dtype


def _read_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    return np.lib.format.read_array_header_2_0(member)


def iter_npz_rows(path: str | os.PathLike, batch_size: int, name: str = "arr_0") -> Iterator[np.ndarray]:
    """Consecutive row blocks (at most `batch_size` rows) of member `name`, without loading it all."""
    with zipfile.ZipFile(path) as archive:
        if f"{name}.npy" not in archive.namelist():
            raise KeyError(f"{path} has no array {name!r}; it holds {npz_members(path)}")
        with archive.open(f"{name}.npy") as member:
            shape, fortran_order, dtype = _read_header(member)
            if fortran_order:
                raise ValueError(f"{path}:{name} is stored in Fortran order; expected C order")
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            remaining = shape[0]
            while remaining:
                count = min(batch_size, remaining)
                data = member.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise ValueError(f"{path}:{name} is truncated")
                yield np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])
                remaining -= count
