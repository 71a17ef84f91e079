"""The settings' bounds of one dataset, as engines.ingest checks them: one mapping, read by the
upload route and by the worker that decodes a large image folder (which must refuse what the
upload would have refused)."""

from __future__ import annotations

from app.core.settings import Settings
from engines.ingest.limits import DatasetLimits


def dataset_limits(settings: Settings) -> DatasetLimits:
    return DatasetLimits(
        max_samples=settings.max_dataset_samples,
        max_arrays=settings.max_dataset_arrays,
        max_bytes=settings.max_dataset_bytes,
        max_image_pixels=settings.max_image_pixels,
    )
