"""Tensor signatures: the names, dtypes and shapes a model takes and gives.

Dims are ints when static, strings when symbolic (`"batch"`) and None when unknown,
exactly as ONNX records them, so users see the signature they exported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[Dim, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def batch_dim(self) -> Dim:
        return self.shape[0] if self.shape else None

    def has_static_batch(self) -> bool:
        return bool(self.shape) and isinstance(self.shape[0], int)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


def specs_from_dicts(items: Sequence[dict[str, Any]]) -> list[TensorSpec]:
    return [TensorSpec.from_dict(item) for item in items]


def onnx_value_to_spec(value: Any) -> TensorSpec:
    """Turn an onnx ValueInfoProto into a TensorSpec (InvalidModelError for non-tensor values)."""
    from onnx import helper

    from engines.errors import InvalidModelError

    if value.type.WhichOneof("value") != "tensor_type":
        raise InvalidModelError(
            f"'{value.name}' is a {value.type.WhichOneof('value') or 'untyped value'}; "
            "only tensor inputs and outputs are supported",
            code="unsupported_io_type",
        )
    tensor_type = value.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    shape: list[Dim] = []
    if tensor_type.HasField("shape"):
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
            else:
                shape.append(None)
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(shape))


def check_array_against_spec(array: np.ndarray, spec: TensorSpec, *, what: str) -> list[str]:
    """Problems that would stop `array` from feeding `spec` (dims after the first must match)."""
    problems: list[str] = []
    if array.dtype.name != spec.dtype:
        problems.append(
            f"{what} '{spec.name}': dtype {array.dtype.name}, model expects {spec.dtype}"
            f" (convert with .astype(np.{spec.dtype}))"
        )
    if array.ndim != spec.rank:
        problems.append(
            f"{what} '{spec.name}': rank {array.ndim} (shape {list(array.shape)}), model expects rank "
            f"{spec.rank} (shape {list(spec.shape)})"
        )
        return problems
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if axis == 0:
            continue
        if isinstance(want, int) and got != want:
            problems.append(
                f"{what} '{spec.name}': dim {axis} is {got}, model expects {want} "
                f"(shape {list(array.shape)} vs {list(spec.shape)})"
            )
    return problems


def validate_feeds(feeds: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> None:
    """Raise InvalidInputError unless `feeds` has exactly the inputs of `specs`, shaped and typed to fit."""
    from engines.errors import InvalidInputError

    expected = {spec.name for spec in specs}
    problems = [f"missing input '{name}'" for name in sorted(expected - set(feeds))]
    problems += [
        f"unknown input '{name}' (inputs: {sorted(expected)})" for name in sorted(set(feeds) - expected)
    ]
    for spec in specs:
        if spec.name in feeds:
            array = feeds[spec.name]
            problems += check_array_against_spec(array, spec, what="input")
            if (
                array.ndim == spec.rank
                and isinstance(spec.batch_dim, int)
                and array.shape[0] != spec.batch_dim
            ):
                problems.append(
                    f"input '{spec.name}': batch of {array.shape[0]}, engine takes {spec.batch_dim}"
                )
    batches = {len(array) for array in feeds.values() if array.ndim > 0}
    if len(batches) > 1:
        problems.append(f"inputs disagree on the batch size: {sorted(batches)}")
    if problems:
        raise InvalidInputError("; ".join(problems), extra={"problems": problems})
