"""Ingest: validate an uploaded ONNX model and describe it.

An upload is either a single `.onnx` file or a `.zip` bundle holding one `.onnx` file plus the
external-data files it references (what `torch.onnx.export(dynamo=True)` writes). Nothing in an
upload may point outside it: archive members with absolute or `..` paths, symlinks, and
external-data locations that escape the bundle are all refused before anything is loaded.
"""

from __future__ import annotations

import math
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from engines.errors import InvalidModelError
from engines.ingest.archives import is_zip_archive, unpacked_size_problem
from engines.ingest.external_data import external_bytes, gather_external_data
from engines.ingest.signature import (
    Dim,
    TensorSpec,
    assign_batch_axes,
    onnx_value_to_spec,
    parse_stated_batch_axes,
)
from engines.ingest.sparse import copy_sparse

#: Protobuf cannot serialize a single message over 2 GiB; bigger models keep external data.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
MODEL_FILENAME = "model.onnx"
EXTERNAL_DATA_FILENAME = "model.onnx.data"
MAX_BUNDLE_MEMBERS = 1000
_SUPPORTED_COMPRESSION = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


@dataclass(frozen=True)
class ModelInfo:
    """What a user wants to know about a model before optimizing it."""

    opset: int
    ir_version: int
    producer: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: int
    macs: int | None  # multiply-accumulates for one sample; None when shapes are not all known
    external_data: bool
    op_types: dict[str, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # what is odd about the model but does not stop it running

    def to_dict(self) -> dict[str, Any]:
        return {
            "opset": self.opset,
            "ir_version": self.ir_version,
            "producer": self.producer,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "parameters": self.parameters,
            "macs": self.macs,
            "external_data": self.external_data,
            "op_types": self.op_types,
            "warnings": list(self.warnings),
        }

    def with_stated_batch_axes(self, text: str) -> ModelInfo:
        """This model with the batch axes a user stated at upload (see
        `engines.ingest.signature.parse_stated_batch_axes`; InvalidModelError when they do not fit)."""
        return replace(self, inputs=tuple(parse_stated_batch_axes(text, self.inputs)))


def unpack_upload(upload: Path, workdir: Path, *, max_unpacked_bytes: int) -> Path:
    """Return the path of the ONNX file inside an upload, unpacking a zip bundle into `workdir`."""
    if upload.stat().st_size == 0:
        raise InvalidModelError("the uploaded file is empty", code="empty_file")
    if not is_zip_archive(upload):
        return upload
    try:
        with zipfile.ZipFile(upload) as bundle:
            return _extract_bundle(bundle, workdir, max_unpacked_bytes)
    except InvalidModelError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, OSError) as exc:
        raise InvalidModelError(
            f"the .zip bundle is damaged or unsupported: {exc}", code="invalid_bundle"
        ) from exc


def _extract_bundle(bundle: zipfile.ZipFile, workdir: Path, max_unpacked_bytes: int) -> Path:
    members = [info for info in bundle.infolist() if not info.is_dir()]
    if len(members) > MAX_BUNDLE_MEMBERS:
        raise InvalidModelError(
            f"the bundle holds {len(members)} files; at most {MAX_BUNDLE_MEMBERS} are accepted",
            code="invalid_bundle",
        )
    problem = unpacked_size_problem(
        bundle, max_unpacked_bytes, remedy="upload a smaller model, or ask the operator for a higher limit"
    )
    if problem:
        raise InvalidModelError(problem, code="upload_too_large")
    root = workdir.resolve()
    targets = [_member_target(info, root) for info in members]
    onnx_targets = [target for target in targets if target.suffix.lower() == ".onnx"]
    if len(onnx_targets) != 1:
        raise InvalidModelError(
            f"a model bundle must hold exactly one .onnx file, found {len(onnx_targets)}",
            code="invalid_bundle",
        )
    for info, target in zip(members, targets, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        with bundle.open(info) as src, open(target, "xb") as dst:  # "x": a duplicate name fails
            copy_sparse(src, dst)  # runs of zeros stay holes: a 2 GiB placeholder costs no disk
    return onnx_targets[0]


def _member_target(info: zipfile.ZipInfo, root: Path) -> Path:
    """Where a member may be written: inside `root`, a plain file, readable without a password."""
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    target = (root / name).resolve()
    if (
        path.is_absolute()
        or ".." in path.parts
        or ":" in name
        or target == root
        or not target.is_relative_to(root)
    ):
        raise InvalidModelError(
            f"archive member '{info.filename}' points outside the bundle", code="archive_path_traversal"
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise InvalidModelError(
            f"archive member '{info.filename}' is a symlink", code="archive_path_traversal"
        )
    if info.flag_bits & 0x1:
        raise InvalidModelError(f"archive member '{info.filename}' is encrypted", code="invalid_bundle")
    if info.compress_type not in _SUPPORTED_COMPRESSION:
        raise InvalidModelError(
            f"archive member '{info.filename}' uses compression method {info.compress_type}; "
            "use stored or deflate",
            code="invalid_bundle",
        )
    return target


def _graph_tensors(graph: Any) -> Iterator[Any]:
    """Initializers (dense and sparse) and tensor attributes, through every subgraph."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Any) -> Iterator[Any]:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor.values
                yield attribute.sparse_tensor.indices
            for sparse in attribute.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


def all_tensors(model: Any) -> Iterator[Any]:
    """Every tensor that can carry external data: the graph's and the model-local functions'."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def check_external_data(model: Any, base_dir: Path) -> bool:
    """Refuse external-data locations outside `base_dir` or missing; return whether any are used."""
    from onnx import TensorProto

    root = base_dir.resolve()
    used = False
    for tensor in all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        used = True
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        candidate = PurePosixPath(location.replace("\\", "/"))
        resolved = (root / location).resolve()
        if (
            not location
            or candidate.is_absolute()
            or ".." in candidate.parts
            or not resolved.is_relative_to(root)
        ):
            raise InvalidModelError(
                f"tensor '{tensor.name}' keeps its data at '{location}', outside the upload",
                code="external_data_outside_upload",
            )
        if not resolved.is_file():
            raise InvalidModelError(
                f"tensor '{tensor.name}' keeps its data in '{location}', which is not in the upload; "
                "upload a .zip holding the .onnx file and its data files",
                code="external_data_missing",
            )
    return used


def load_model_proto(path: Path, *, with_external_data: bool = False) -> Any:
    """Parse an ONNX file, mapping protobuf errors onto InvalidModelError."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=with_external_data)
    except Exception as exc:  # protobuf DecodeError, truncated files, random bytes
        raise InvalidModelError(
            f"the file is not a readable ONNX model ({type(exc).__name__}: {exc})", code="invalid_model"
        ) from exc


def inspect_model(path: Path, *, scratch_dir: Path | None = None) -> ModelInfo:
    """Validate an ONNX file fully (external-data paths, checker, shape inference) and describe it.

    External-data locations are checked before anything reads them: they must name files inside
    the ONNX file's directory (the unpacked upload). Weights are never loaded: the checker and
    shape inference work on the path, so a model of 2 GiB or more (external data) is checked in the
    memory its graph takes. Shape inference writes the model again (embedded weights included)
    into a temporary folder in `scratch_dir` (default: the system's temporary folder).
    """
    import onnx

    model = load_model_proto(path)
    external = check_external_data(model, path.parent)
    warnings: list[str] = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as full_exc:
        # The full check adds strict shape inference. Exporters often declare shapes that disagree
        # with it (an output declared [N, 2, 3] that computes [N, 4]); ONNX Runtime merges them
        # leniently and runs the model, so only the structural check refuses an upload.
        try:
            onnx.checker.check_model(str(path))
        except Exception as exc:
            raise InvalidModelError(
                f"the ONNX checker rejected the model: {exc}", code="onnx_check_failed"
            ) from exc
        warnings.append(
            "declared shapes disagree with ONNX shape inference "
            f"({str(full_exc).splitlines()[0][:300]}); ONNX Runtime runs it with the shapes it computes"
        )
    with tempfile.TemporaryDirectory(dir=scratch_dir) as tmp:
        inferred_path = Path(tmp) / "inferred.onnx"
        try:
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred_path), strict_mode=False)
            inferred = onnx.load(str(inferred_path), load_external_data=False)
        except Exception as exc:
            raise InvalidModelError(f"shape inference failed: {exc}", code="onnx_check_failed") from exc
    graph = inferred.graph
    initializer_names = {tensor.name for tensor in graph.initializer}
    raw_inputs = [onnx_value_to_spec(value) for value in graph.input if value.name not in initializer_names]
    inputs = tuple(assign_batch_axes(raw_inputs))
    outputs = tuple(assign_batch_axes(raw_inputs, [onnx_value_to_spec(value) for value in graph.output]))
    if not inputs or not outputs:
        raise InvalidModelError("the model has no inputs or no outputs", code="onnx_check_failed")
    _refuse_absurd_inputs(inputs)
    opset = next((entry.version for entry in inferred.opset_import if entry.domain in ("", "ai.onnx")), 0)
    op_types: dict[str, int] = {}
    for node in graph.node:
        op_types[node.op_type] = op_types.get(node.op_type, 0) + 1
    return ModelInfo(
        opset=int(opset),
        ir_version=int(inferred.ir_version),
        producer=f"{inferred.producer_name} {inferred.producer_version}".strip(),
        inputs=inputs,
        outputs=outputs,
        # weights inside If/Loop/Scan bodies and Constant nodes count too (Silero VAD keeps all of its there)
        parameters=sum(math.prod(tensor.dims) for tensor in all_tensors(inferred)),
        macs=count_macs(inferred),
        external_data=external,
        op_types=dict(sorted(op_types.items())),
        warnings=tuple(warnings),
    )


#: One sample of one input over this many elements (4 GiB of float32) is not a model anyone serves,
#: and would only fail later, in a worker, after taking its memory.
MAX_SAMPLE_ELEMENTS = 2**30


def _refuse_absurd_inputs(inputs: tuple[TensorSpec, ...]) -> None:
    """Refuse at upload an input whose declared sample (its static dims, the batch left out) is absurd."""
    for spec in inputs:
        static = [dim for dim in spec.sample_shape() if isinstance(dim, int) and dim > 0]
        elements = math.prod(static)
        if elements > MAX_SAMPLE_ELEMENTS:
            raise InvalidModelError(
                f"input '{spec.name}' declares {elements:,} elements per sample (shape {list(spec.shape)}), "
                f"over {MAX_SAMPLE_ELEMENTS:,}: no engine can be measured or served on inputs that large; "
                "export the model with its real input size",
                code="input_too_large",
            )


def _static_shape(shape: tuple[Dim, ...]) -> tuple[int, ...] | None:
    """A shape for one sample: the leading symbolic batch dim becomes 1; any other unknown dim fails."""
    dims: list[int] = []
    for axis, dim in enumerate(shape):
        if isinstance(dim, int):
            dims.append(dim)
        elif axis == 0:
            dims.append(1)
        else:
            return None
    return tuple(dims)


def count_macs(model: Any) -> int | None:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul for one sample.

    These dominate CNNs and transformers; elementwise ops are left out, as papers do.
    Returns None when a counted op has a shape that inference could not resolve.
    """
    graph = model.graph
    if any(
        attribute.HasField("g") or attribute.graphs for node in graph.node for attribute in node.attribute
    ):
        return None  # compute inside If/Loop/Scan bodies: not counted, so not claimed
    shapes: dict[str, tuple[int, ...] | None] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.WhichOneof("value") == "tensor_type":
            shapes[value.name] = _static_shape(onnx_value_to_spec(value).shape)
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    total = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        in_shapes = [shapes.get(name) for name in node.input[:2]]
        out_shape = shapes.get(node.output[0])
        if out_shape is None or any(shape is None for shape in in_shapes):
            return None
        data_shape, weight_shape = in_shapes[0], in_shapes[1]
        assert data_shape is not None and weight_shape is not None
        if node.op_type == "Conv":
            total += math.prod(out_shape) * math.prod(weight_shape[1:])
        elif node.op_type == "ConvTranspose":
            total += math.prod(data_shape) * math.prod(weight_shape[1:])
        elif node.op_type == "Gemm":
            trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
            inner = data_shape[0] if trans_a else data_shape[-1]
            total += math.prod(out_shape) * inner
        else:
            total += math.prod(out_shape) * data_shape[-1]
    return int(total)


def write_normalized(
    path: Path, dest_dir: Path, *, keep_external_from: int = PROTOBUF_LIMIT_BYTES
) -> list[Path]:
    """Write the model as `model.onnx` in `dest_dir`, external data (if any) in one known file.

    Downstream stages then never deal with the uploader's file layout. Returns the files written.
    A model whose file and external data come to `keep_external_from` bytes or more (by default
    2 GiB, what one protobuf message can hold) keeps its weights external and unread: they are
    gathered into `model.onnx.data` file to file. Smaller models are loaded whole and written as
    one self-contained file.
    """
    import onnx
    from google.protobuf.message import EncodeError

    model = load_model_proto(path)
    external = [tensor for tensor in all_tensors(model) if tensor.data_location == onnx.TensorProto.EXTERNAL]
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / MODEL_FILENAME
    if external and path.stat().st_size + external_bytes(external, path.parent) >= keep_external_from:
        data_path = dest_dir / EXTERNAL_DATA_FILENAME
        gather_external_data(external, path.parent, data_path)
        target.write_bytes(model.SerializeToString())  # the graph alone: weights stay where they are
        return [target, data_path]
    if external:
        onnx.load_external_data_for_model(model, str(path.parent))
    try:
        fits = model.ByteSize() < PROTOBUF_LIMIT_BYTES
    except EncodeError:  # protobuf refuses to even measure a message over 2 GiB
        fits = False
    if fits:
        onnx.save_model(model, str(target))
        return [target]
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILENAME,
        size_threshold=1024,
    )
    return [target, dest_dir / EXTERNAL_DATA_FILENAME]


def onnx_signature(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file, with batch axes (weights are not read)."""
    graph = load_model_proto(onnx_path).graph
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = assign_batch_axes([onnx_value_to_spec(v) for v in graph.input if v.name not in initializers])
    outputs = assign_batch_axes(inputs, [onnx_value_to_spec(value) for value in graph.output])
    return inputs, outputs
