"""Tensor signatures: the names, dtypes and shapes a model takes and gives.

Dims are ints when static, strings when symbolic (`"batch"`) and None when unknown,
as ONNX records them, so users see the signature they exported. One exception: a `dim_value`
of -1 or 0 (Paddle and older exporters write -1 for "dynamic") is dynamic, as ONNX Runtime
treats it, and becomes None.

Each input has a **batch axis**, the dim along which samples stack, decided once here by
`assign_batch_axes` for every layer (datasets, measurement, serving): recurrent state carries its
batch in dim 1, a scalar such as a sample rate has none, and a model exported with a static batch
of 1 keeps it in dim 0 whatever else is dynamic (a sequence length is not a batch). A user may state
an input's axis at upload (`parse_stated_batch_axes`); a stated axis is kept as stated, and every
layer that reads a signature from a graph or an engine file (backends' runners and builds, hence
measurement and serving) applies the statements with `decide_batch_axes`: the stated axis if any,
else the graph's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[Dim, ...]
    #: The dim samples stack along; None when the tensor has none (a scalar, shared state).
    #: Set for a whole signature by `assign_batch_axes`; 0 until then.
    batch_axis: int | None = 0
    #: True when a user stated `batch_axis` at upload: `assign_batch_axes` keeps it as it is.
    batch_axis_stated: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def batch_dim(self) -> Dim:
        return (
            None if self.batch_axis is None or self.batch_axis >= self.rank else self.shape[self.batch_axis]
        )

    def has_static_batch(self) -> bool:
        return self.batch_axis is not None and isinstance(self.batch_dim, int)

    def sample_shape(self) -> tuple[Dim, ...]:
        """The shape of one sample: the tensor's shape without its batch axis (a dataset row)."""
        if self.batch_axis is None:
            return self.shape
        return self.shape[: self.batch_axis] + self.shape[self.batch_axis + 1 :]

    def shape_at(self, batch_size: int) -> tuple[int, ...] | None:
        """The full shape at `batch_size` (the batch axis set to it), or None when a dim besides
        the batch is dynamic: there is no one shape to make up for it."""
        dims = []
        for axis, dim in enumerate(self.shape):
            if axis == self.batch_axis:
                dims.append(batch_size)
            elif isinstance(dim, int):
                dims.append(dim)
            else:
                return None
        return tuple(dims)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        if not self.batch_axis_stated:
            del data["batch_axis_stated"]  # stored and shown only where a user stated it
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        """A stored spec: its batch axis is kept only when stated (others are decided afresh)."""
        shape = tuple(normalize_dim(dim) for dim in data["shape"])
        if data.get("batch_axis_stated"):
            return cls(data["name"], data["dtype"], shape, data.get("batch_axis"), batch_axis_stated=True)
        return cls(name=data["name"], dtype=data["dtype"], shape=shape)


def normalize_dim(dim: Any) -> Dim:
    """A dim as this package keeps it: -1 and 0 (dynamic in ONNX Runtime) and unknowns are None."""
    if isinstance(dim, bool):
        return None
    if isinstance(dim, int):
        return dim if dim > 0 else None
    return dim if isinstance(dim, str) and dim else None


def specs_from_dicts(items: Sequence[dict[str, Any]]) -> list[TensorSpec]:
    """Specs stored as JSON, with batch axes decided afresh (rows stored before they existed too)."""
    return assign_batch_axes([TensorSpec.from_dict(item) for item in items])


def _dynamic_axes(spec: TensorSpec) -> list[int]:
    return [axis for axis, dim in enumerate(spec.shape) if not isinstance(dim, int)]


def _symbol_counts(inputs: Sequence[TensorSpec]) -> dict[str, tuple[int, int]]:
    """Per symbolic name: (inputs that open their dynamic dims with it, inputs that have it at all)."""
    firsts: dict[str, int] = {}
    for spec in inputs:
        dynamic = _dynamic_axes(spec)
        first = spec.shape[dynamic[0]] if dynamic else None
        if isinstance(first, str):
            firsts[first] = firsts.get(first, 0) + 1
    return {name: (count, sum(name in spec.shape for spec in inputs)) for name, count in firsts.items()}


def batch_symbol(inputs: Sequence[TensorSpec]) -> str | None:
    """The symbolic name of the batch dim: the name most inputs open their dynamic dims with (ties:
    the name more inputs have anywhere, then the first seen)."""
    counts = _symbol_counts(inputs)
    return max(counts, key=lambda name: counts[name]) if counts else None


def _shared_symbol(inputs: Sequence[TensorSpec]) -> str | None:
    """The batch name when at least two inputs carry it: then a dim named otherwise is not the batch."""
    symbol = batch_symbol(inputs)
    return symbol if symbol is not None and _symbol_counts(inputs)[symbol][1] >= 2 else None


def _names_batch(dim: Dim) -> bool:
    """A symbolic dim whose name says it is the batch (`batch`, `batch_size`, `N`)."""
    return isinstance(dim, str) and ("batch" in dim.lower() or dim.lower() in ("n", "b"))


def _fixed_batch(inputs: Sequence[TensorSpec]) -> int | None:
    """The model's batch when it is static, else None: no input opens with a dynamic dim, and either
    every input is static (then the first input's dim 0, as before) or the first input opens with 1
    (a batch of one exported as a constant beside a dynamic sequence length or image size)."""
    ranked = [spec for spec in inputs if spec.rank > 0]
    if not ranked or any(not isinstance(spec.shape[0], int) for spec in ranked):
        return None
    if not any(_dynamic_axes(spec) for spec in inputs):
        return int(ranked[0].shape[0])  # type: ignore[arg-type]
    return 1 if ranked[0].shape[0] == 1 else None


def _batch_axis(spec: TensorSpec, symbol: str | None, shared: bool, fixed_batch: int | None) -> int | None:
    if fixed_batch is not None:
        # A static batch: dim 0 where it equals it, unless the graph names another dim the batch.
        named = [axis for axis, dim in enumerate(spec.shape) if _names_batch(dim)]
        if named:
            return named[0]
        return 0 if spec.rank > 0 and spec.shape[0] == fixed_batch else None
    if symbol is not None and symbol in spec.shape:
        return spec.shape.index(symbol)
    dynamic = _dynamic_axes(spec)
    if shared:  # the batch has a name this tensor lacks: only an unnamed dynamic dim can be it
        dynamic = [axis for axis in dynamic if spec.shape[axis] is None]
    return dynamic[0] if dynamic else None


def assign_batch_axes(
    inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec] | None = None
) -> list[TensorSpec]:
    """Decide each tensor's batch axis (returns `inputs`, or `outputs` when given, with it set).

    The rule. A model whose batch is static (no input opens with a dynamic dim, and all inputs are
    static or the first opens with 1): dim 0 where it equals that batch, unless a dim is named as a
    batch (`batch`, `N`); a dynamic dim named otherwise (`seq_len`) is not the batch, so
    `[1, 2, "seq_len"]` stacks along dim 0 as the release before the per-input rule did. Otherwise:
    the dim named like the inputs' batch dim; else the tensor's first dynamic dim (only an unnamed
    one when two inputs or more share the batch's name: a dim named otherwise, such as a sequence
    length, is not the batch); else none (a scalar such as a sample rate, or a tensor every sample
    shares). Outputs follow the inputs. A stated axis (`batch_axis_stated`) is kept, and when it
    falls on a named dim, that name is the batch's for the other tensors (outputs included).
    Specs read from an engine file (which knows nothing of statements) go through
    `decide_batch_axes` instead, with the model's stated axes.
    """
    symbol, shared = batch_symbol(inputs), _shared_symbol(inputs) is not None
    fixed_batch = _fixed_batch(inputs)
    stated = _stated_symbol(inputs)
    if stated is not None:  # the user named the batch: tensors that carry that dim stack along it
        symbol, fixed_batch = stated, None
    targets = inputs if outputs is None else outputs
    return [
        spec
        if spec.batch_axis_stated
        else replace(spec, batch_axis=_batch_axis(spec, symbol, shared, fixed_batch))
        for spec in targets
    ]


def _stated_symbol(inputs: Sequence[TensorSpec]) -> str | None:
    """The name of the first dim a user stated as an input's batch, if it has one."""
    for spec in inputs:
        if spec.batch_axis_stated and spec.batch_axis is not None and spec.batch_axis < spec.rank:
            dim = spec.shape[spec.batch_axis]
            if isinstance(dim, str):
                return dim
    return None


#: Input name to the batch axis a user stated at upload (None: the input has no batch axis).
StatedAxes = Mapping[str, int | None]


def stated_batch_axes(inputs: Sequence[TensorSpec]) -> dict[str, int | None]:
    """The axes a user stated among a model's stored inputs, by name: what an engine built from
    the model is told (its own file knows only the graph), and what its record keeps."""
    return {spec.name: spec.batch_axis for spec in inputs if spec.batch_axis_stated}


def decide_batch_axes(
    inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], stated: StatedAxes | None = None
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The batch axes of a signature read from a graph or an engine, the one rule every layer uses
    (backends' runners and builds, measurement, serving): each input's stated axis if the user
    stated one (`stated`, from `stated_batch_axes`), else the graph's (`assign_batch_axes`); the
    outputs follow. Why: an engine file carries the graph only, and a time-major [T, N, F] input
    whose graph says dim 0 would be measured and served along the wrong dim."""
    stated = stated or {}
    marked = [
        replace(spec, batch_axis=stated[spec.name], batch_axis_stated=True) if spec.name in stated else spec
        for spec in inputs
    ]
    decided = assign_batch_axes(marked)
    return decided, assign_batch_axes(decided, outputs)


def parse_stated_batch_axes(text: str, inputs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """`inputs` with the batch axes a user stated at upload, as JSON `{"input name": axis or null}`
    (null: the input has no batch axis, every sample shares it), applied and kept from then on.

    InvalidModelError (code `invalid_batch_axis`) names what is wrong: not a JSON object, an unknown
    input, an axis that is not an integer in [0, rank) or null.
    """
    import json

    from engines.errors import InvalidModelError

    names = [spec.name for spec in inputs]
    example = json.dumps({names[0] if names else "input": 0})
    try:
        stated = json.loads(text)
    except ValueError:
        stated = None
    if not isinstance(stated, dict):
        raise InvalidModelError(
            f"batch_axis must be a JSON object of input name to axis (an integer, or null for none), "
            f"e.g. {example}",
            code="invalid_batch_axis",
        )
    specs = {spec.name: spec for spec in inputs}
    problems = [
        f"'{name}' is no input of the model (inputs: {names})" for name in stated if name not in specs
    ]
    for name, axis in stated.items():
        if name in specs and axis is not None:
            rank = specs[name].rank
            if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < rank:
                problems.append(
                    f"input '{name}' (shape {list(specs[name].shape)}): batch axis {json.dumps(axis)} is not "
                    f"an integer in [0, {rank}) or null"
                )
    if problems:
        raise InvalidModelError(
            "batch_axis: " + "; ".join(problems) + f"; e.g. {example}", code="invalid_batch_axis"
        )
    return [
        replace(spec, batch_axis=stated[spec.name], batch_axis_stated=True) if spec.name in stated else spec
        for spec in inputs
    ]


def ambiguous_batch_axes(inputs: Sequence[TensorSpec]) -> list[str]:
    """Sentences for inputs whose batch axis cannot be told apart: several unnamed dynamic dims,
    none named like the batch dim that other inputs share."""
    symbol = _shared_symbol(inputs)
    if symbol is None:
        return []  # no name shared by inputs (tf2onnx names each input's dims anew): first dynamic dims
    problems = []
    for spec in inputs:
        unnamed = [axis for axis, dim in enumerate(spec.shape) if dim is None]
        if symbol not in spec.shape and len(unnamed) > 1:
            problems.append(
                f"input '{spec.name}' (shape {list(spec.shape)}) has unnamed dynamic dims {unnamed} and none "
                f"is named '{symbol}' like the other inputs' batch dim, so its batch axis cannot be decided; "
                f"export it with the batch dim named '{symbol}' (e.g. dynamic_axes={{'{spec.name}': "
                f"{{AXIS: '{symbol}'}}}}); its dataset array then holds one row per sample, shaped like "
                "the input without that axis"
            )
    return problems


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
                shape.append(normalize_dim(int(dim.dim_value)))
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
            else:
                shape.append(None)
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(shape))


def _dtype_problem(dtype: str, spec: TensorSpec, what: str) -> list[str]:
    if dtype == spec.dtype:
        return []
    return [
        f"{what} '{spec.name}': dtype {dtype}, model expects {spec.dtype} "
        f"(convert with .astype(np.{spec.dtype}))"
    ]


def _dims_problems(
    got: tuple[int, ...], want: tuple[Dim, ...], spec: TensorSpec, what: str, skip: int | None, noun: str
) -> list[str]:
    if len(got) != len(want):
        return [
            f"{what} '{spec.name}': {noun}rank {len(got)} (shape {list(got)}), model expects rank "
            f"{len(want)} (shape {list(want)})"
        ]
    return [
        f"{what} '{spec.name}': {noun}dim {axis} is {size}, model expects {expected} "
        f"(shape {list(got)} vs {list(want)})"
        for axis, (size, expected) in enumerate(zip(got, want, strict=True))
        if axis != skip and isinstance(expected, int) and size != expected
    ]


def check_array_against_spec(array: np.ndarray, spec: TensorSpec, *, what: str) -> list[str]:
    """Problems that would stop `array` (a whole feed) from feeding `spec`; the batch axis may vary."""
    return _dtype_problem(array.dtype.name, spec, what) + _dims_problems(
        tuple(array.shape), spec.shape, spec, what, spec.batch_axis, ""
    )


def check_rows_against_spec(
    row_shape: tuple[int, ...], dtype: str, spec: TensorSpec, *, what: str
) -> list[str]:
    """Problems that would stop dataset rows (one per sample) from feeding `spec`.

    A row is one sample: the input's shape without its batch axis (a scalar input: a scalar row).
    """
    problems = _dtype_problem(dtype, spec, what)
    want = spec.sample_shape()
    dims = _dims_problems(row_shape, want, spec, what, None, "each row has ")
    if dims and len(row_shape) != len(want) and spec.batch_axis not in (None, 0):
        dims[-1] += (
            f"; its batch is dim {spec.batch_axis}, so the dataset gives one row per sample shaped "
            f"{list(want)}, samples first"
        )
    fitting = _axes_rows_fit(row_shape, spec) if dims else []
    if fitting:
        dims[-1] += (
            f"; rows shaped {list(row_shape)} fit batch axis {fitting[0]} of this input: if its samples "
            f"stack there, upload the model again with the form field "
            f'batch_axis={{"{spec.name}": {fitting[0]}}}'
        )
    return problems + dims


def _axes_rows_fit(row_shape: tuple[int, ...], spec: TensorSpec) -> list[int]:
    """The batch axes other than the current one for which rows shaped `row_shape` would fit."""
    fitting = []
    for axis in range(spec.rank):
        want = spec.shape[:axis] + spec.shape[axis + 1 :]
        fits = len(want) == len(row_shape) and all(
            not isinstance(dim, int) or dim == size for dim, size in zip(want, row_shape, strict=True)
        )
        if axis != spec.batch_axis and fits:
            fitting.append(axis)
    return fitting


def validate_feeds(feeds: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> None:
    """Raise InvalidInputError unless `feeds` has exactly the inputs of `specs`, shaped and typed to fit."""
    from engines.errors import InvalidInputError

    expected = {spec.name for spec in specs}
    problems = [f"missing input '{name}'" for name in sorted(expected - set(feeds))]
    problems += [
        f"unknown input '{name}' (inputs: {sorted(expected)})" for name in sorted(set(feeds) - expected)
    ]
    batches: set[int] = set()
    for spec in specs:
        if spec.name not in feeds:
            continue
        array = feeds[spec.name]
        found = check_array_against_spec(array, spec, what="input")
        problems += found
        if found or spec.batch_axis is None:
            continue
        size = array.shape[spec.batch_axis]
        batches.add(size)
        if isinstance(spec.batch_dim, int) and size != spec.batch_dim:
            problems.append(f"input '{spec.name}': batch of {size}, engine takes {spec.batch_dim}")
    if len(batches) > 1:
        problems.append(f"inputs disagree on the batch size: {sorted(batches)}")
    if problems:
        raise InvalidInputError("; ".join(problems), extra={"problems": problems})


def feed_batch_size(feeds: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> int:
    """Samples in validated feeds: the size of the first batched input's batch axis (1 if none)."""
    for spec in specs:
        array = feeds.get(spec.name)
        if spec.batch_axis is not None and array is not None and array.ndim > spec.batch_axis:
            return int(array.shape[spec.batch_axis])
    return 1
