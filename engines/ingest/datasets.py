"""Datasets: `.npz` archives with one array per model input and optional integer `labels`.

Every array holds one row per sample, samples first: a row is the input's shape without its batch
axis (engines.ingest.signature decides that axis), so recurrent state whose batch is dim 1 and a scalar
sample rate are laid out like any other input. A batch stacks rows along each input's batch axis;
an input without one takes the batch's first row, so its rows must agree within a batch.

Arrays are read with `allow_pickle=False` and every member must be a real `.npy` array of a
numeric dtype: an `.npz` is a zip that can carry pickles, and user data is never unpickled.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engines.errors import DatasetMismatchError, InvalidDatasetError
from engines.ingest.archives import open_dataset_zip
from engines.ingest.limits import DatasetLimits
from engines.ingest.mapped_npz import map_members
from engines.ingest.npz_members import BLOCK_BYTES, NpyMember, Scan, iter_flat, read_members, scan
from engines.ingest.signature import TensorSpec, ambiguous_batch_axes, check_rows_against_spec

LABELS_KEY = "labels"
_ALLOWED_KINDS = {"b", "i", "u", "f"}  # bool, signed, unsigned, float


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class DatasetInfo:
    samples: int
    arrays: dict[str, ArraySpec]  # input arrays only; labels are described by has_labels/classes
    has_labels: bool
    classes: int | None  # distinct label values
    #: Arrays whose rows are all equal (e.g. a sample rate): they can feed an input without a batch axis
    #: at any batch size. Rows stored before this was recorded count as varying.
    uniform_arrays: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "arrays": {name: spec.to_dict() for name, spec in self.arrays.items()},
            "has_labels": self.has_labels,
            "classes": self.classes,
            "uniform_arrays": list(self.uniform_arrays),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetInfo:
        return cls(
            samples=data["samples"],
            arrays={
                name: ArraySpec(tuple(spec["shape"]), spec["dtype"]) for name, spec in data["arrays"].items()
            },
            has_labels=data["has_labels"],
            classes=data["classes"],
            uniform_arrays=tuple(data.get("uniform_arrays", ())),
        )


def rows_uniform(rows: np.ndarray) -> bool:
    """Whether every row (sample) of an array is the same."""
    return len(rows) < 2 or bool((rows == rows[:1]).all())


@dataclass(frozen=True)
class Dataset:
    inputs: dict[str, np.ndarray]  # one row per sample, keyed by model input name once bound
    labels: np.ndarray | None
    #: Each input's batch axis (engines.ingest.signature.assign_batch_axes); an input not named here: 0.
    batch_axes: dict[str, int | None] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, count: int) -> Dataset:
        return Dataset(
            inputs={name: array[:count] for name, array in self.inputs.items()},
            labels=None if self.labels is None else self.labels[:count],
            batch_axes=self.batch_axes,
        )

    def feeds(self, index: slice | np.ndarray) -> dict[str, np.ndarray]:
        """Model inputs for the samples at `index`: rows stacked along each input's batch axis."""
        feeds: dict[str, np.ndarray] = {}
        for name, rows in self.inputs.items():
            axis, picked = self.batch_axes.get(name, 0), rows[index]
            if axis is None:
                feeds[name] = np.asarray(picked[0])  # a 0-d array, not a numpy scalar
            elif axis == 0:
                feeds[name] = picked
            else:
                feeds[name] = np.ascontiguousarray(np.moveaxis(picked, 0, axis))
        return feeds

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return self.feeds(slice(start, stop))

    def varying_unbatched(self) -> list[str]:
        """Inputs without a batch axis whose rows differ: batches of one sample only."""
        return [
            name
            for name, rows in self.inputs.items()
            if self.batch_axes.get(name, 0) is None and not rows_uniform(rows)
        ]

    def largest_batch(self) -> int | None:
        """The largest batch these rows can form (None: any)."""
        return 1 if self.varying_unbatched() else None


@contextmanager
def _reading(path: Path, max_unpacked_bytes: int) -> Iterator[zipfile.ZipFile]:
    """Open the archive; turn whatever a damaged or hostile one raises into InvalidDatasetError."""
    try:
        with open_dataset_zip(
            path,
            max_unpacked_bytes,
            not_a_zip="the file is not an .npz archive (save it with numpy.savez)",
            remedy="split the dataset into several smaller uploads",
        ) as archive:
            yield archive
    except InvalidDatasetError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
            raise InvalidDatasetError(
                f"the archive holds object arrays or pickles, which are never loaded: {exc}",
                code="pickle_refused",
            ) from exc
        raise InvalidDatasetError(f"the archive could not be read: {exc}") from exc
    except Exception as exc:  # damaged zips, bad CRCs, truncated members, unsupported compression
        raise InvalidDatasetError(f"the archive could not be read: {exc}") from exc


def read_npz(path: Path, *, max_unpacked_bytes: int) -> dict[str, np.ndarray]:
    """Read every array of an `.npz` safely, or raise InvalidDatasetError saying why not.

    Every member's header is checked against the archive's declared sizes before anything is
    inflated. Arrays come back in native byte order: a big-endian `>f4` array fed as float32
    would be read byte-swapped by every runtime, so it is converted here, once.
    """
    arrays: dict[str, np.ndarray] = {}
    with _reading(path, max_unpacked_bytes) as archive:
        read_members(archive)
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                value = npz[key]
                if not isinstance(value, np.ndarray):
                    raise InvalidDatasetError(f"member '{key}' is not a .npy array")
                arrays[key] = value.astype(value.dtype.newbyteorder("="), copy=False)
    if not arrays:
        raise InvalidDatasetError("the archive holds no arrays")
    return arrays


def inspect_npz(
    path: Path,
    *,
    max_unpacked_bytes: int,
    block_bytes: int = BLOCK_BYTES,
    limits: DatasetLimits | None = None,
) -> DatasetInfo:
    """What `inspect_arrays(read_npz(path))` says, in a few blocks of memory whatever the arrays
    weigh: the number of members (from the zip's directory), shapes, dtypes and sample counts
    (from the members' headers: a dataset they already condemn is never inflated) are checked
    against `limits` first, values block by block. What an upload is checked with."""
    limits = limits or DatasetLimits()
    with _reading(path, max_unpacked_bytes) as archive:
        limits.check_arrays(len(archive.infolist()))
        members = {member.key: member for member in read_members(archive)}
        if not members:
            raise InvalidDatasetError("the archive holds no arrays")
        return _describe(_ArchiveValues(archive, members, block_bytes), limits)


class _Values(Protocol):
    """A dataset's arrays as `_describe` reads them: their headers, then their values in blocks."""

    def specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]: ...

    def blocks(self, key: str) -> Iterator[np.ndarray]: ...

    def scan(self, key: str) -> Scan: ...


@dataclass(frozen=True)
class _ArrayValues:
    arrays: dict[str, np.ndarray]

    def specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {key: (tuple(int(d) for d in value.shape), value.dtype) for key, value in self.arrays.items()}

    def blocks(self, key: str) -> Iterator[np.ndarray]:
        yield self.arrays[key]

    def scan(self, key: str) -> Scan:
        result = Scan(rows_uniform=rows_uniform(self.arrays[key]))
        result.add(self.arrays[key])
        return result


@dataclass(frozen=True)
class _ArchiveValues:
    archive: zipfile.ZipFile
    members: dict[str, NpyMember]
    block_bytes: int

    def specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {key: (member.shape, member.dtype) for key, member in self.members.items()}

    def blocks(self, key: str) -> Iterator[np.ndarray]:
        return iter_flat(self.archive, self.members[key], self.block_bytes)

    def scan(self, key: str) -> Scan:
        return scan(self.archive, self.members[key], self.block_bytes)


def inspect_arrays(arrays: dict[str, np.ndarray], limits: DatasetLimits | None = None) -> DatasetInfo:
    """Check shapes, dtypes, values and labels; describe the dataset."""
    return _describe(_ArrayValues(arrays), limits or DatasetLimits())


#: Distinct label values counted at most: labels are class indices, and counting them takes memory.
MAX_CLASSES = 2**20


def _describe(values: _Values, limits: DatasetLimits) -> DatasetInfo:
    """Every check of a dataset, shapes and dtypes first (from headers alone), then values."""
    specs = values.specs()
    inputs = {key: spec for key, spec in specs.items() if key != LABELS_KEY}
    if not inputs:
        raise InvalidDatasetError("the archive holds only labels; add one array per model input")
    for key, (shape, dtype) in inputs.items():
        if dtype.kind not in _ALLOWED_KINDS:
            raise InvalidDatasetError(f"array '{key}' has dtype {dtype}; only numeric arrays are accepted")
        if len(shape) == 0:
            raise InvalidDatasetError(f"array '{key}' is a scalar; the first dim must count samples")
    counts = {key: shape[0] for key, (shape, _) in inputs.items()}
    if len(set(counts.values())) != 1:
        raise InvalidDatasetError(
            f"arrays disagree on the number of samples: {counts}; every array holds one row per sample, "
            "samples first (for an input whose batch is not its dim 0, such as recurrent state "
            "[layers, batch, hidden], move it first: np.moveaxis(array, 1, 0))"
        )
    samples = next(iter(counts.values()))
    if samples == 0:
        raise InvalidDatasetError("the dataset has no samples")
    limits.check_samples(samples)
    if LABELS_KEY in specs:
        _check_label_spec(*specs[LABELS_KEY], samples)
    scans = {key: values.scan(key) for key in inputs}
    for key, found in scans.items():
        if not found.finite:
            raise InvalidDatasetError(f"array '{key}' holds NaN or Inf values", code="non_finite_values")
    classes = _count_classes(values.blocks(LABELS_KEY)) if LABELS_KEY in specs else None
    return DatasetInfo(
        samples=samples,
        # in native byte order, as read_npz gives them: `>f4` is float32
        arrays={
            name: ArraySpec(shape, dtype.newbyteorder("=").name) for name, (shape, dtype) in inputs.items()
        },
        has_labels=LABELS_KEY in specs,
        classes=classes,
        uniform_arrays=tuple(key for key, found in scans.items() if found.rows_uniform),
    )


def _check_label_spec(shape: tuple[int, ...], dtype: np.dtype, samples: int) -> None:
    if dtype.kind not in ("i", "u") or len(shape) != 1:
        raise InvalidDatasetError(
            f"labels must be a 1-D integer array, got dtype {dtype} and shape {list(shape)}",
            code="invalid_labels",
        )
    if shape[0] != samples:
        raise InvalidDatasetError(
            f"labels has {shape[0]} entries, but the inputs have {samples} samples", code="invalid_labels"
        )


def _count_classes(blocks: Iterator[np.ndarray]) -> int:
    """Distinct label values, refusing negative ones (labels are class indices)."""
    seen: np.ndarray | None = None
    for block in blocks:
        if (block < 0).any():
            raise InvalidDatasetError("labels must be class indices >= 0", code="invalid_labels")
        seen = np.unique(block) if seen is None else np.union1d(seen, block)
        if len(seen) > MAX_CLASSES:
            raise InvalidDatasetError(
                f"labels hold more than {MAX_CLASSES:,} distinct values; labels are class indices",
                code="invalid_labels",
            )
    return 0 if seen is None else len(seen)


def bind_arrays(array_names: Sequence[str], model_inputs: Sequence[TensorSpec]) -> dict[str, str]:
    """Map dataset array names to model input names: by name, or one unnamed array to a single input."""
    names = [name for name in array_names if name != LABELS_KEY]
    if len(model_inputs) == 1 and len(names) == 1:
        return {names[0]: model_inputs[0].name}
    expected = {spec.name for spec in model_inputs}
    missing = sorted(expected - set(names))
    extra = sorted(set(names) - expected)
    problems = [f"missing array for model input '{name}'" for name in missing]
    problems += [f"array '{name}' matches no model input (inputs: {sorted(expected)})" for name in extra]
    if problems:
        raise DatasetMismatchError(problems)
    return {name: name for name in names}


def check_fits_model(info: DatasetInfo, model_inputs: Sequence[TensorSpec]) -> list[str]:
    """Raise DatasetMismatchError listing every way the dataset does not fit the model's inputs.

    Returns the inputs without a batch axis whose rows differ (they allow batches of one only).
    """
    binding = bind_arrays(list(info.arrays), model_inputs)
    specs = {spec.name: spec for spec in model_inputs}
    problems = ambiguous_batch_axes(model_inputs)
    for array_name, input_name in binding.items():
        array_spec = info.arrays[array_name]
        problems += check_rows_against_spec(
            array_spec.shape[1:], array_spec.dtype, specs[input_name], what="input"
        )
    if problems:
        raise DatasetMismatchError(problems)
    return [
        input_name
        for array_name, input_name in binding.items()
        if specs[input_name].batch_axis is None and array_name not in info.uniform_arrays
    ]


def load_dataset(
    path: Path,
    model_inputs: Sequence[TensorSpec],
    *,
    max_unpacked_bytes: int,
    scratch_dir: Path | None = None,
) -> Dataset:
    """A stored dataset with its arrays keyed by the model's input names. With `scratch_dir` (a
    job's), the arrays are memory-mapped (engines.ingest.mapped_npz): a batch reads its rows from
    disk, and the job's memory does not grow with the dataset; without, they are read into memory."""
    if scratch_dir is None:
        arrays = read_npz(path, max_unpacked_bytes=max_unpacked_bytes)
    else:
        with _reading(path, max_unpacked_bytes) as archive:
            arrays = map_members(path, archive, scratch_dir)
    array_for = {
        input_name: array_name for array_name, input_name in bind_arrays(list(arrays), model_inputs).items()
    }
    return Dataset(
        # in the model's input order: the pruning path feeds them positionally
        inputs={spec.name: arrays[array_for[spec.name]] for spec in model_inputs},
        labels=arrays.get(LABELS_KEY),
        batch_axes={spec.name: spec.batch_axis for spec in model_inputs},
    )
