"""An image folder decoded straight into the `.npz` every job reads, in bounded memory.

The images are decoded one at a time into a memory-mapped `.npy` beside the target (the output
never sits whole in memory), which is then copied into the `.npz` uncompressed (what `numpy.savez`
writes, and what engines.ingest.mapped_npz maps in place when a job reads it). Used at upload for
a small folder and by the `decode_images` job for a large one: one way to write either.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from engines.ingest.datasets import LABELS_KEY
from engines.ingest.images import ImageFolderPlan, ProgressFn, decode_image_folder


def write_image_npz(
    zip_path: Path,
    plan: ImageFolderPlan,
    npz_path: Path,
    *,
    max_pixels: int,
    progress: ProgressFn | None = None,
) -> None:
    """Decode the plan's images into `npz_path` (its folder holds a temporary `.npy` meanwhile);
    raise what decoding raises (InvalidImageError naming the member), leaving no `.npz` behind."""
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    rows_path = npz_path.with_name(f"{npz_path.stem}.rows.npy")
    try:
        rows = np.lib.format.open_memmap(rows_path, mode="w+", dtype=plan.spec.dtype, shape=plan.shape)
        try:
            decode_image_folder(zip_path, plan, rows, max_pixels=max_pixels, progress=progress)
            rows.flush()
        finally:
            del rows
        with zipfile.ZipFile(npz_path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.write(rows_path, arcname=f"{plan.input_name}.npy")
            if plan.labels is not None:
                labels = io.BytesIO()
                np.save(labels, plan.labels, allow_pickle=False)
                archive.writestr(f"{LABELS_KEY}.npy", labels.getvalue())
    except BaseException:
        npz_path.unlink(missing_ok=True)
        raise
    finally:
        rows_path.unlink(missing_ok=True)
