"""Errors the optimization core raises, each with a stable machine-readable code.

The API maps them onto 4xx responses and the workers onto a job's error, so a user
sees the same `code` whether the problem was caught at upload or inside a job.
"""

from __future__ import annotations

import re
from typing import Any

#: An absolute path of two components or more, as runtimes put them in their messages
#: ("Load model from /tmp/ort.quant.x/augmented_model.onnx failed").
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"`:,;()\[\]{}<>]+/)+([^\s/'\"`:,;()\[\]{}<>]*)")


def scrub_paths(text: str) -> str:
    """The text with every absolute path cut to its file name: error texts never show where a
    server keeps its files."""
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1) or "…", text)


class EngineError(Exception):
    """Base class: `code` is machine-readable, `detail` is for a person."""

    code: str = "engine_error"

    def __init__(self, detail: str, *, code: str | None = None, extra: dict[str, Any] | None = None):
        detail = scrub_paths(detail)
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.extra = extra or {}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "detail": self.detail, **self.extra}


class InvalidModelError(EngineError):
    """The uploaded file is not a valid, self-contained ONNX model."""

    code = "invalid_model"


class InvalidDatasetError(EngineError):
    """The uploaded dataset cannot be read safely or is inconsistent."""

    code = "invalid_dataset"


class InvalidImageError(InvalidDatasetError):
    """A member of an image-folder dataset that cannot become a sample; `member` names it.

    Codes (engines.ingest.images): `image_decode_failed` (corrupt, truncated, not an image, pixels
    that are not 8 or 16 bits), `image_too_large` (over the decompression-bomb pixel limit or the
    per-file byte limit), `not_an_image` (an extension that is not an accepted image type),
    `image_size_mismatch` (images of differing sizes where none is resized).
    """

    code = "image_decode_failed"

    def __init__(self, detail: str, *, member: str, code: str | None = None):
        super().__init__(detail, code=code, extra={"member": member})
        self.member = member


class DatasetMismatchError(EngineError):
    """The dataset's arrays do not fit the model's inputs; `mismatches` lists each problem."""

    code = "dataset_mismatch"

    def __init__(self, mismatches: list[str]):
        super().__init__(
            "dataset does not match the model's inputs: " + "; ".join(mismatches),
            extra={"mismatches": mismatches},
        )
        self.mismatches = mismatches


class InvalidRecipeError(EngineError):
    """A recipe that cannot run on this model (e.g. a batch size its static batch dim forbids)."""

    code = "invalid_recipe"


class InvalidInputError(EngineError):
    """Inference inputs that do not match the engine's signature."""

    code = "invalid_input"


class BackendUnavailableError(EngineError):
    """The backend an engine needs is not present on this node (e.g. TensorRT on a CPU box)."""

    code = "backend_unavailable"


class ConversionError(EngineError):
    """A model in another framework's format (a `torch.export` program) could not be turned into
    ONNX, for a reason other than one named operator; `detail` carries the exporter's message."""

    code = "conversion_failed"


class UnsupportedOperatorError(ConversionError):
    """The conversion met operators it has no translation for; `operators` names them (as the
    exporter does: `aten.linalg_qr.default`, `mylib::my_op`). Same code as the ONNX -> PyTorch
    direction (`engines.torch_bridge`): an operator the converter cannot translate."""

    code = "unsupported_op"

    def __init__(self, detail: str, operators: list[str]):
        super().__init__(detail, extra={"operators": operators})
        self.operators = operators


class Cancelled(Exception):
    """Raised by a progress callback to stop a stage cooperatively."""
