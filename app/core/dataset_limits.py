"""The settings' bounds of one dataset, as engines.ingest checks them: one mapping, read by the
upload route and by the worker that decodes a large image folder (which must refuse what the
upload would have refused)."""

from __future__ import annotations

from app.core.settings import Settings
from engines.ingest.limits import DatasetLimits
from engines.ingest.texts import TextLimits


def dataset_limits(settings: Settings) -> DatasetLimits:
    return DatasetLimits(
        max_samples=settings.max_dataset_samples,
        max_arrays=settings.max_dataset_arrays,
        max_bytes=settings.max_dataset_bytes,
        max_image_pixels=settings.max_image_pixels,
    )


def text_limits(settings: Settings) -> TextLimits:
    """A text upload's bounds beside dataset_limits' (whose max_samples bounds its lines)."""
    return TextLimits(
        max_line_bytes=settings.max_text_line_bytes,
        max_tokenizer_bytes=settings.max_tokenizer_bytes,
        tokenize_timeout_s=settings.tokenize_timeout_s,
        tokenizer_memory_bytes=settings.tokenizer_memory_bytes,
    )
