"""What one dataset may hold, checked from what an upload declares before anything is decoded.

An `.npz` declares its shapes in a few header bytes and an image folder its output in a
preprocessing spec: a few hundred bytes can ask for gigabytes of arrays, millions of samples or
thousands of members. Each bound here is refused with a code, the number found and the limit,
and is the one place the rule is stated (the API maps the codes onto 413 or 422, a job records
them as its error).
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.errors import InvalidDatasetError, InvalidImageError

#: Codes that mean "too much", which the API answers with 413 (the others are 422).
TOO_LARGE_CODES = frozenset({"upload_too_large", "dataset_too_large", "too_many_samples"})


@dataclass(frozen=True)
class DatasetLimits:
    """The bounds of one dataset; the server reads them from its settings."""

    max_samples: int = 100_000
    max_arrays: int = 256  # members of an .npz: one per model input, plus labels
    max_bytes: int = 1024 * 1024 * 1024  # the arrays once decoded
    max_image_pixels: int = 50_000_000  # one image, from its header

    def check_samples(self, samples: int) -> None:
        if samples > self.max_samples:
            raise InvalidDatasetError(
                f"the dataset holds {samples} samples, over the limit of {self.max_samples}: split it "
                "into several datasets (evaluation and calibration need far fewer)",
                code="too_many_samples",
                extra={"samples": samples, "limit": self.max_samples},
            )

    def check_arrays(self, arrays: int) -> None:
        if arrays > self.max_arrays:
            raise InvalidDatasetError(
                f"the archive holds {arrays} arrays, over the limit of {self.max_arrays}: a dataset "
                "holds one array per model input, plus 'labels'",
                code="too_many_arrays",
                extra={"arrays": arrays, "limit": self.max_arrays},
            )

    def check_bytes(self, nbytes: int, what: str, remedy: str) -> None:
        """`what` says what makes `nbytes` (e.g. '12 images of 224x224 in float32')."""
        if nbytes > self.max_bytes:
            raise InvalidDatasetError(
                f"{what} make {nbytes} bytes of arrays, over the limit of {self.max_bytes}: {remedy}",
                code="dataset_too_large",
                extra={"bytes": nbytes, "limit": self.max_bytes},
            )

    def check_image_pixels(self, member: str, width: int, height: int) -> None:
        if width * height > self.max_image_pixels:
            raise InvalidImageError(
                f"image '{member}' is {width}x{height} pixels ({width * height}), over the limit of "
                f"{self.max_image_pixels} per image: it is refused before it is decoded; scale it down",
                member=member,
                code="image_too_large",
            )
