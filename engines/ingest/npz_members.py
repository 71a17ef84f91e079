"""The members of an `.npz`, read without holding an array in memory.

An `.npz` is a zip of `.npy` files, and a zip can declare far more than it weighs: a 2 MB upload
can inflate to a 2 GiB array. Here every member's `.npy` header (a few hundred bytes) is read and
checked against the size the zip's central directory declares for it before any of its data is
inflated, and data then comes in blocks of at most `block_bytes`, so checking an array costs a
block of memory whatever its size. (`numpy.load` on a member inflates all of it into one buffer
and copies it into the array: twice its size, for as long as the check takes.)
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

from engines.errors import InvalidDatasetError

#: What a block of data read from a member may take in memory.
BLOCK_BYTES = 8 * 1024 * 1024
_NPY_SUFFIX = ".npy"


@dataclass(frozen=True)
class NpyMember:
    """One `.npy` member as its header describes it, checked against the zip's declared size."""

    key: str  # the member name without `.npy`, as numpy.load names it
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int  # where the data starts in the member, after the header

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def data_bytes(self) -> int:
        return self.elements * self.dtype.itemsize


def member_key(name: str) -> str:
    return name[: -len(_NPY_SUFFIX)] if name.endswith(_NPY_SUFFIX) else name


def read_members(archive: zipfile.ZipFile) -> list[NpyMember]:
    """Every member's header, in archive order; raise InvalidDatasetError for a member that is not a
    `.npy` array, holds Python objects, or whose header disagrees with the size the zip declares."""
    return [_read_member(archive, info) for info in archive.infolist()]


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> NpyMember:
    key = member_key(info.filename)
    with archive.open(info) as stream:
        if stream.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
            raise InvalidDatasetError(f"member '{key}' is not a .npy array (save arrays with numpy.savez)")
        major, minor = _read_version(stream, key)
        try:
            if (major, minor) == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
            elif (major, minor) == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
            else:  # 3.0 only differs for structured dtypes with non-Latin-1 field names
                raise InvalidDatasetError(
                    f"member '{key}' is a .npy file of format {major}.{minor}; save numeric arrays with "
                    "numpy.savez"
                )
        except ValueError as exc:
            raise InvalidDatasetError(f"member '{key}' has a damaged .npy header: {exc}") from exc
        data_offset = stream.tell()
    if dtype.hasobject:
        raise InvalidDatasetError(
            f"member '{key}' holds Python objects (dtype {dtype}), which are never unpickled: "
            "save numeric arrays",
            code="pickle_refused",
        )
    member = NpyMember(key, info, tuple(int(d) for d in shape), dtype, bool(fortran_order), data_offset)
    held = info.file_size - data_offset
    if held != member.data_bytes:
        raise InvalidDatasetError(
            f"member '{key}' declares shape {list(member.shape)} of {dtype} ({member.data_bytes} bytes) "
            f"but holds {held} bytes: the archive is damaged; save it again with numpy.savez"
        )
    return member


def _read_version(stream: IO[bytes], key: str) -> tuple[int, int]:
    version = stream.read(2)
    if len(version) != 2:
        raise InvalidDatasetError(f"member '{key}' is a truncated .npy file")
    return version[0], version[1]


def _open_data(archive: zipfile.ZipFile, member: NpyMember) -> IO[bytes]:
    stream = archive.open(member.info)
    stream.read(member.data_offset)
    return stream


def _read_exactly(stream: IO[bytes], member: NpyMember, count: int) -> np.ndarray:
    """The next `count` elements of a member's data, as a read-only flat array."""
    size = count * member.dtype.itemsize
    data = stream.read(size)
    if len(data) != size:
        raise InvalidDatasetError(f"member '{member.key}' is truncated")
    return np.frombuffer(data, dtype=member.dtype)


def iter_flat(
    archive: zipfile.ZipFile, member: NpyMember, block_bytes: int = BLOCK_BYTES
) -> Iterator[np.ndarray]:
    """The member's elements in file order, as flat blocks of at most `block_bytes`."""
    per_block = _per_block(member, block_bytes)
    left = member.elements
    with _open_data(archive, member) as stream:
        while left:
            count = min(per_block, left)
            yield _read_exactly(stream, member, count)
            left -= count


@dataclass
class Scan:
    """What one pass over a member's values found."""

    finite: bool = True  # no NaN or Inf (always true for integers and booleans)
    rows_uniform: bool = True  # every sample (index along axis 0) holds the same values

    def add(self, block: np.ndarray) -> None:
        if self.finite and block.dtype.kind == "f":
            self.finite = bool(np.isfinite(block).all())

    @property
    def done(self) -> bool:
        """Nothing left to learn: a non-finite value condemns the array whatever follows."""
        return not self.finite


def scan(archive: zipfile.ZipFile, member: NpyMember, block_bytes: int = BLOCK_BYTES) -> Scan:
    """Whether the member's values are finite and its samples all alike, in one pass of blocks of at
    most `block_bytes` (about three of them in memory), whatever the array weighs. Samples are
    compared as numpy compares them (`rows == rows[:1]`)."""
    samples = member.shape[0] if member.shape else 0
    per_sample = member.elements // samples if samples else 0
    if samples < 2 or per_sample == 0:
        result = Scan()
        for block in iter_flat(archive, member, block_bytes):
            result.add(block)
            if result.done:
                break
        return result
    if member.fortran_order and len(member.shape) > 1:
        # Column-major: the samples of one position are consecutive, one run per position.
        return _scan_runs(archive, member, run=samples, runs=per_sample, block_bytes=block_bytes)
    return _scan_rows(archive, member, row=per_sample, rows=samples, block_bytes=block_bytes)


def _per_block(member: NpyMember, block_bytes: int) -> int:
    return max(1, block_bytes // max(1, member.dtype.itemsize))


def _scan_rows(archive: zipfile.ZipFile, member: NpyMember, *, row: int, rows: int, block_bytes: int) -> Scan:
    """Row-major: are all rows equal to the first one?"""
    result, per_block = Scan(), _per_block(member, block_bytes)
    with _open_data(archive, member) as stream:
        if row <= per_block:  # whole rows per block, compared with the first row kept aside
            first = _read_exactly(stream, member, row)
            result.add(first)
            left = rows - 1
            while left and not result.done:
                count = min(max(1, per_block // row), left)
                block = _read_exactly(stream, member, count * row).reshape(count, row)
                result.add(block)
                result.rows_uniform = result.rows_uniform and bool((block == first).all())
                left -= count
            return result
        # A row larger than a block: read row 0 again beside each later row, piece by piece, while
        # they are alike (at most one more pass over the data).
        for index in range(rows):
            first_row = _open_data(archive, member) if index and result.rows_uniform else None
            try:
                left = row
                while left and not result.done:
                    count = min(per_block, left)
                    piece = _read_exactly(stream, member, count)
                    result.add(piece)
                    if first_row is not None and result.rows_uniform:
                        result.rows_uniform = bool((piece == _read_exactly(first_row, member, count)).all())
                    left -= count
            finally:
                if first_row is not None:
                    first_row.close()
            if result.done:
                break
    return result


def _scan_runs(archive: zipfile.ZipFile, member: NpyMember, *, run: int, runs: int, block_bytes: int) -> Scan:
    """Column-major: does every run of `run` consecutive elements hold one value?"""
    result, per_block = Scan(), _per_block(member, block_bytes)
    with _open_data(archive, member) as stream:
        if run <= per_block:
            left = runs
            while left and not result.done:
                count = min(max(1, per_block // run), left)
                block = _read_exactly(stream, member, count * run).reshape(count, run)
                result.add(block)
                result.rows_uniform = result.rows_uniform and bool((block == block[:, :1]).all())
                left -= count
            return result
        for _ in range(runs):
            first: np.ndarray | None = None
            left = run
            while left and not result.done:
                count = min(per_block, left)
                piece = _read_exactly(stream, member, count)
                result.add(piece)
                first = piece[:1] if first is None else first
                result.rows_uniform = result.rows_uniform and bool((piece == first).all())
                left -= count
            if result.done:
                break
    return result
