"""A stored `.npz` opened as memory-mapped arrays, so a job's memory does not grow with its dataset.

`numpy.load` on an `.npz` inflates every member it is asked for into memory (and `mmap_mode` is
ignored for `.npz`): a 3.5 GiB dataset took 3.5 GiB, then more to copy it. Here a member stored
uncompressed in native byte order (what `numpy.savez` writes, and what the server writes for an
image folder) is mapped where it lies in the archive; any other (compressed, big-endian) is
written once, block by block, to a `.npy` in the job's scratch folder and mapped from there. The
arrays are ordinary ndarrays (copy-on-write maps: writable, never written back), read from disk
as batches touch them; the pages they take are the kernel's page cache, which it reclaims under
pressure, not the worker's own memory.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

from engines.ingest.npz_members import NpyMember, iter_flat, read_members

#: The fixed part of a zip local file header; the name and extra field follow it.
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_MAGIC = b"PK\x03\x04"


def map_members(path: Path, archive: zipfile.ZipFile, scratch_dir: Path) -> dict[str, np.ndarray]:
    """Every member of the (already checked) archive as a memory-mapped array, in native byte
    order, keyed as `numpy.load` keys them."""
    arrays: dict[str, np.ndarray] = {}
    for member in read_members(archive):
        native = member.dtype.newbyteorder("=")
        if member.info.compress_type == zipfile.ZIP_STORED and member.dtype == native:
            arrays[member.key] = _map_in_place(path, member)
        else:
            arrays[member.key] = _map_copy(archive, member, native, scratch_dir)
    return arrays


def _order(member: NpyMember) -> str:
    return "F" if member.fortran_order else "C"


def _map_in_place(path: Path, member: NpyMember) -> np.ndarray:
    """The member's data where it lies in the archive file."""
    if member.elements == 0:
        return np.empty(member.shape, dtype=member.dtype, order=_order(member))
    with path.open("rb") as handle:
        handle.seek(member.info.header_offset)
        fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
    if fields[0] != _LOCAL_MAGIC:
        raise ValueError(f"member '{member.key}' has no local header where the directory says")
    name_length, extra_length = fields[-2], fields[-1]
    start = member.info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    return np.memmap(
        path,
        dtype=member.dtype,
        mode="c",
        offset=start + member.data_offset,
        shape=member.shape,
        order=_order(member),
    )


def _map_copy(archive: zipfile.ZipFile, member: NpyMember, native: np.dtype, scratch_dir: Path) -> np.ndarray:
    """The member inflated once into a `.npy` in `scratch_dir`, a block at a time, then mapped."""
    scratch_dir.mkdir(parents=True, exist_ok=True)
    target = scratch_dir / f"{len(list(scratch_dir.iterdir()))}.npy"
    fortran = member.fortran_order
    out = np.lib.format.open_memmap(
        target, mode="w+", dtype=native, shape=member.shape, fortran_order=fortran
    )
    flat = out.reshape(-1, order="F" if fortran else "C")  # a view: the file's own order
    done = 0
    for block in iter_flat(archive, member):
        flat[done : done + len(block)] = block  # converted to native byte order as it is copied
        done += len(block)
    out.flush()
    del out, flat
    return np.load(target, mmap_mode="c")
