"""A `torch.export` program (`.pt2`) converted to ONNX, the way a user's own export would be.

The program is loaded by `engines.convert.pt2_archive` (checked, nothing unpickled or evaluated),
then given to `torch.onnx.export(program, dynamo=True)`, which uses it as it is: its dynamic dims
(the `Dim`s given to `torch.export.export`, stored as shape symbols) become symbolic ONNX dims. A
symbol that is dim 0 of every input is renamed `batch`, so the signature reads like a hand export.
The ONNX file is an ordinary upload: `engines.ingest.model.inspect_model` describes it.

Errors: InvalidModelError from the loader; UnsupportedOperatorError (`unsupported_op`) naming the
operators the exporter has no translation for, with its message; ConversionError
(`conversion_failed`) otherwise; BackendUnavailableError when torch or onnxscript is missing.
Messages carry no server paths (EngineError cuts them) and no terminal colours.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.convert.pt2_archive import load_exported_program
from engines.errors import BackendUnavailableError, ConversionError, EngineError, UnsupportedOperatorError

#: The dynamo exporter writes opset 18 and later (older opsets only by down-conversion, which
#: fails on the ops it changed), up to `newest_opset()`; torch 2.13 writes 20 by default.
MIN_OPSET = 18
ONNX_FILENAME = "model.onnx"
BATCH_DIM_NAME = "batch"
#: An exporter message longer than this is cut (its stack of causes says the same thing many times).
MAX_MESSAGE_CHARS = 800

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: How the exporter names an operator it could not translate.
_OVERLOAD = re.compile(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)")
_NODE_TARGET = re.compile(r"call_function\[target=torch\.ops\.([\w.]+)\]")
_SHAPE_SYMBOL = re.compile(r"[a-z]{1,4}[0-9]+")


@dataclass(frozen=True)
class ConversionResult:
    """The ONNX model a program became, and what a person should know about the conversion."""

    onnx_path: Path
    opset: int
    #: Each input's symbolic (dynamic) axes; an input with none is absent.
    dynamic_dims: dict[str, tuple[int, ...]]
    external_data: bool  # weights in `<onnx file>.data` beside it (models of 2 GiB or more)
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx_file": self.onnx_path.name,
            "opset": self.opset,
            "dynamic_dims": {name: list(axes) for name, axes in self.dynamic_dims.items()},
            "external_data": self.external_data,
            "notes": list(self.notes),
        }


def convert_exported_program(
    pt2_path: Path, out_dir: Path, *, max_unpacked_bytes: int, opset: int | None = None
) -> ConversionResult:
    """Convert the torch.export program in `pt2_path` to `out_dir/model.onnx`.

    `max_unpacked_bytes` bounds what the archive may declare once unpacked (checked before anything
    is read); `opset` (18 or later; default: the exporter's) is the ONNX opset written.
    """
    torch = _require_exporter()
    _check_opset(opset)
    loaded = load_exported_program(pt2_path, max_unpacked_bytes=max_unpacked_bytes)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / ONNX_FILENAME
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                loaded.program, (), dynamo=True, opset_version=opset, verbose=False, optimize=True
            )
            onnx_program.save(str(onnx_path))
    except EngineError:
        raise
    except Exception as exc:
        raise _conversion_error(exc) from exc
    import onnx
    import onnxscript

    notes = list(loaded.notes)
    model = onnx.load(str(onnx_path), load_external_data=False)
    renamed = _name_batch_dim(model)
    if renamed:
        onnx.save(model, str(onnx_path))
        notes.append(
            f"the program's dynamic dim '{renamed}' (dim 0 of every input) is named '{BATCH_DIM_NAME}'"
        )
    written_opset = next(
        (entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0
    )
    notes.insert(
        0,
        f"converted by torch.onnx.export (dynamo exporter) of torch {torch.__version__} with onnxscript "
        f"{onnxscript.__version__}"
        + (f"; saved by torch {loaded.saved_by_torch}" if loaded.saved_by_torch else ""),
    )
    return ConversionResult(
        onnx_path=onnx_path,
        opset=int(written_opset),
        dynamic_dims=_dynamic_dims(model),
        external_data=_uses_external_data(model),
        notes=tuple(notes),
    )


def newest_opset() -> int:
    """The newest opset this node's exporter writes (torch 2.13: 23)."""
    import onnx

    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:
        return int(onnx.defs.onnx_opset_version())
    return min(int(ONNX_MAX_OPSET), int(onnx.defs.onnx_opset_version()))


def _check_opset(opset: int | None) -> None:
    newest = newest_opset()
    if opset is not None and (
        isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest
    ):
        raise ConversionError(
            f"opset {opset!r} cannot be written: choose one from {MIN_OPSET} to {newest}",
            code="invalid_opset",
        )


def _require_exporter() -> Any:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(
            f"converting PyTorch programs needs torch and onnxscript on the worker ({exc.name} is missing; "
            "both come with the `prune` extra)"
        ) from exc
    return torch


# --- errors -------------------------------------------------------------------------------------


def _conversion_error(exc: BaseException) -> ConversionError:
    """The exporter's failure as an EngineError: the operators it names, its innermost message."""
    chain = _causes(exc)
    operators: list[str] = []
    for cause in chain:
        text = str(cause)
        for op, overload in _OVERLOAD.findall(text):
            operators.append(f"{op}.{overload}")
        operators.extend(_NODE_TARGET.findall(text))
    operators = list(dict.fromkeys(operators))
    message = _readable(_innermost_message(chain))
    if operators:
        return UnsupportedOperatorError(
            f"the ONNX exporter cannot translate {', '.join(operators)}: {message}", operators
        )
    return ConversionError(f"the ONNX exporter failed: {message}")


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _innermost_message(chain: list[BaseException]) -> str:
    """The deepest cause with something to say: the exporter wraps it in paragraphs of advice."""
    for cause in reversed(chain):
        text = _ANSI.sub("", str(cause)).strip()
        if text:
            return f"{type(cause).__name__}: {text}"
    return type(chain[0]).__name__


def _readable(text: str) -> str:
    text = _ANSI.sub("", text)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


# --- the ONNX file ------------------------------------------------------------------------------


def _graphs(graph: Any) -> list[Any]:
    """A graph and every subgraph (If/Loop/Scan bodies) in it."""
    found = [graph]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                found.extend(_graphs(attribute.g))
            for subgraph in attribute.graphs:
                found.extend(_graphs(subgraph))
    return found


def _name_batch_dim(model: Any) -> str | None:
    """Rename, in `model`, the shape symbol that is dim 0 of every input (torch's `s77`) to `batch`,
    everywhere it appears (`2*s77` too). Returns the old name, or None when there is no such symbol."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    firsts = set()
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 0:
            continue  # a scalar input has no batch
        firsts.add(dims[0].dim_param if dims[0].HasField("dim_param") else None)
    if len(firsts) != 1:
        return None
    symbol = firsts.pop()
    if not symbol or not _SHAPE_SYMBOL.fullmatch(symbol):
        return None
    pattern = re.compile(rf"\b{re.escape(symbol)}\b")
    graphs = _graphs(model.graph)
    values = [value for graph in graphs for value in (*graph.input, *graph.output, *graph.value_info)]
    if any(dim.dim_param == BATCH_DIM_NAME for value in values for dim in value.type.tensor_type.shape.dim):
        return None
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = pattern.sub(BATCH_DIM_NAME, dim.dim_param)
    return symbol


def _dynamic_dims(model: Any) -> dict[str, tuple[int, ...]]:
    initializers = {tensor.name for tensor in model.graph.initializer}
    dims: dict[str, tuple[int, ...]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        axes = tuple(
            axis for axis, dim in enumerate(value.type.tensor_type.shape.dim) if not dim.HasField("dim_value")
        )
        if axes:
            dims[value.name] = axes
    return dims


def _uses_external_data(model: Any) -> bool:
    from onnx import TensorProto

    return any(tensor.data_location == TensorProto.EXTERNAL for tensor in model.graph.initializer)
