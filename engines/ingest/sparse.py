"""Copy bytes with runs of zeros left as holes, as `cp --sparse=always` does.

Model weights hold long runs of zeros (pruned layers, padding, placeholder exports), and a 2 GiB
data file that compresses to 2 MB in a zip is mostly zeros: unpacking it with holes costs the disk
only the blocks that hold data. Reading a hole gives zeros, so nothing downstream can tell.
"""

from __future__ import annotations

import os
from typing import IO

CHUNK_BYTES = 1024 * 1024
_ZEROS = bytes(CHUNK_BYTES)


def copy_sparse(source: IO[bytes], target: IO[bytes], limit: int | None = None) -> int:
    """Copy `source` (at most `limit` bytes when given) to `target` from its current position,
    seeking over all-zero chunks instead of writing them; returns the bytes copied. `target` must
    be a real, seekable file: it is extended to its full length at the end, holes included."""
    copied = 0
    while limit is None or copied < limit:
        want = CHUNK_BYTES if limit is None else min(CHUNK_BYTES, limit - copied)
        chunk = source.read(want)
        if not chunk:
            break
        if chunk == (_ZEROS if len(chunk) == CHUNK_BYTES else bytes(len(chunk))):
            target.seek(len(chunk), os.SEEK_CUR)
        else:
            target.write(chunk)
        copied += len(chunk)
    target.truncate(target.tell())  # a trailing hole still counts in the file's length
    return copied
