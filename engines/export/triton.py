"""Engines as a Triton Inference Server model repository: `<name>/config.pbtxt`, `<name>/1/<model>`.

optiforge already serves the protocol Triton speaks; this is for a team that runs Triton itself and
wants the engine, configured as optiforge measured and serves it. An ONNX Runtime engine is an ONNX
file (platform `onnxruntime_onnx`, CPU instances), with its external-data files beside it under
their own names (the ONNX file points at them by name); a TensorRT engine is a plan (platform
`tensorrt_plan`, GPU instances) that loads only on the GPU architecture and TensorRT version that
built it, so its config says which: `cc_model_filenames` keyed by that compute capability (what
Triton itself reads), and a comment for people. An OpenVINO engine is its IR, `model.xml` with its
`model.bin` (`backend: "openvino"`, Triton's OpenVINO backend, CPU instances). What other backends
run (PyTorch) is not a file a Triton backend loads as it is: those engines are refused with
`not_exportable`.

Batching: Triton batches along dim 0 of every input and every output at once (`max_batch_size` > 0,
`dims` without that dim). An engine qualifies when each of its tensors has a dynamic batch axis at
dim 0, the rule optiforge's own dynamic batcher follows; any other (a static batch, the batch in
dim 1 as recurrent state has it, an input without one such as a sample rate) gets
`max_batch_size: 0` and full dims, so Triton hands requests to it as they come.

The configs are written as text: Triton's protobuf schema is not a dependency of the server (the
tests parse every config with Triton's own `ModelConfig`). A repository is planned first
(`plan_repository`: every check, nothing written), then written as a directory or as a zip whose
members are streamed from the engine files, so a multi-GB engine is never held in memory.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from optiforge_client.tensors import ProtocolError, datatype_of

from engines.errors import EngineError, InvalidModelError
from engines.ingest.model import all_tensors, check_external_data, load_model_proto
from engines.ingest.signature import Dim, TensorSpec, assign_batch_axes

#: The version directory every model gets: an engine is one immutable version.
VERSION = "1"
CONFIG_FILENAME = "config.pbtxt"
#: A model name is a directory name in the repository, and Triton's name for the model in URLs.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_COMPUTE_CAPABILITY = re.compile(r"^[0-9]+\.[0-9]+$")
#: Zip members get one fixed time, so the same engines give the same bytes.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class _Format:
    platform: str
    model_filename: str
    instance_kind: str
    what: str  # for messages: what the repository holds for such an engine
    #: The config field naming the runtime: `platform` (onnxruntime_onnx, tensorrt_plan), or
    #: `backend` for the runtimes Triton has only as a backend (openvino: no platform name exists).
    field: str = "platform"
    #: Files beside the engine file, by the suffix they have there and the name Triton loads
    #: (OpenVINO's IR: the `.bin` of weights next to the `.xml`, which OpenVINO finds by its stem).
    companions: tuple[tuple[str, str], ...] = ()


#: optiforge backend -> how Triton runs its engines. Only these backends can be exported.
_FORMATS = {
    "onnxruntime-cpu": _Format(
        "onnxruntime_onnx", "model.onnx", "KIND_CPU", "an ONNX file for Triton's onnxruntime backend"
    ),
    "tensorrt": _Format("tensorrt_plan", "model.plan", "KIND_GPU", "a plan for Triton's TensorRT backend"),
    # Triton's OpenVINO backend loads `<version>/model.xml` with its `model.bin` (its default model
    # file name) and is named by `backend: "openvino"`; it runs on CPU instances.
    "openvino-cpu": _Format(
        "openvino",
        "model.xml",
        "KIND_CPU",
        "an IR (model.xml + model.bin) for Triton's OpenVINO backend",
        field="backend",
        companions=((".bin", "model.bin"),),
    ),
}
#: Triton's platform name of each exportable backend's engines.
PLATFORMS = {backend: fmt.platform for backend, fmt in _FORMATS.items()}


@dataclass(frozen=True)
class GpuTarget:
    """The GPU a TensorRT plan was built on: TensorRT refuses a plan on another architecture."""

    compute_capability: str  # "major.minor", as Triton keys `cc_model_filenames`
    gpu_model: str | None = None


@dataclass(frozen=True)
class TritonEngine:
    """One engine as the exporter needs it: plain values, no database row.

    `inputs`/`outputs` are the engine's signature; their batch axes are decided afresh here
    (`assign_batch_axes`), as everywhere else, so specs read from JSON can be passed as they are.
    `max_batch_size` is Triton's `max_batch_size` when the engine batches along dim 0 (ignored
    otherwise): the largest batch the engine is known to take. `dynamic_batching_delay_ms` turns on
    Triton's dynamic batcher with that delay (None: off).
    """

    name: str  # the model's name in the repository: a directory name
    engine_id: str
    backend: str
    precision: str
    engine_path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 1
    dynamic_batching_delay_ms: float | None = None
    built_with: str | None = None  # the runtime and its version, e.g. "onnxruntime 1.32.0"
    gpu: GpuTarget | None = None  # TensorRT: the GPU the plan was built for

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.dynamic_batching_delay_ms is not None and self.dynamic_batching_delay_ms < 0:
            raise ValueError(f"dynamic_batching_delay_ms must be >= 0, got {self.dynamic_batching_delay_ms}")


@dataclass(frozen=True)
class RepositoryFile:
    """One file of a repository: copied from `source`, or `content` as it is."""

    path: str  # inside the repository, POSIX, e.g. "digits/1/model.onnx"
    source: Path | None = None
    content: bytes | None = None


def batches_along_dim0(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> bool:
    """Whether Triton may batch the engine: every tensor has a dynamic batch axis at dim 0 (specs
    with batch axes assigned)."""
    return bool(inputs) and all(
        spec.rank > 0 and spec.batch_axis == 0 and not spec.has_static_batch() for spec in (*inputs, *outputs)
    )


def triton_datatype(dtype: str) -> str:
    """Triton's `data_type` of a numpy dtype name ("float32" -> "TYPE_FP32"): the Open Inference
    Protocol datatype optiforge's /v2 metadata shows for the same tensor, with Triton's prefix
    (strings are TYPE_STRING). EngineError `not_exportable` for a dtype Triton has no type for."""
    special = {"object": "TYPE_STRING", "str": "TYPE_STRING", "bfloat16": "TYPE_BF16"}
    if dtype in special:
        return special[dtype]
    try:
        return "TYPE_" + datatype_of(dtype)
    except (ProtocolError, TypeError):
        raise EngineError(f"dtype {dtype} has no Triton data type", code="not_exportable") from None


def render_config(engine: TritonEngine) -> str:
    """The engine's `config.pbtxt` (protobuf text format of Triton's ModelConfig)."""
    fmt = _format(engine)
    inputs = assign_batch_axes(engine.inputs)
    outputs = assign_batch_axes(inputs, engine.outputs)
    batched = batches_along_dim0(inputs, outputs)
    if engine.dynamic_batching_delay_ms is not None and not batched:
        raise EngineError(
            f"engine '{engine.engine_id}' has dynamic batching on, but not every tensor has a dynamic "
            "batch dim at dim 0, which Triton's dynamic batcher needs",
            code="not_batchable",
        )
    lines = [
        *_comments(engine),
        f"name: {_quote(engine.name)}",
        f"{fmt.field}: {_quote(fmt.platform)}",
        f"max_batch_size: {engine.max_batch_size if batched else 0}",
        *_tensors("input", inputs, batched, engine),
        *_tensors("output", outputs, batched, engine),
        f"instance_group [ {{ kind: {fmt.instance_kind} }} ]",
    ]
    if engine.dynamic_batching_delay_ms is not None:
        lines += [
            "dynamic_batching {",
            f"  preferred_batch_size: [ {engine.max_batch_size} ]",
            f"  max_queue_delay_microseconds: {round(engine.dynamic_batching_delay_ms * 1000)}",
            "}",
        ]
    if engine.gpu is not None:
        capability = _quote(engine.gpu.compute_capability)
        lines.append(f"cc_model_filenames [ {{ key: {capability} value: {_quote(fmt.model_filename)} }} ]")
    return "\n".join(lines) + "\n"


def plan_repository(engines: Sequence[TritonEngine]) -> list[RepositoryFile]:
    """Every file of the repository, sorted by path, after every check; nothing is written.

    EngineError codes: `no_engines`, `not_exportable` (a backend, dtype or GPU record Triton cannot
    take), `invalid_model_name`, `duplicate_model_name`, `not_batchable` (dynamic batching on an
    engine Triton cannot batch), `engine_file_missing` (the engine file or its external data).
    """
    if not engines:
        raise EngineError("no engine to export: name one or more", code="no_engines")
    refused = [engine for engine in engines if engine.backend not in _FORMATS]
    if refused:
        which = ", ".join(f"'{engine.engine_id}' ({engine.backend})" for engine in refused)
        can = "; ".join(f"{backend} engines ({fmt.what})" for backend, fmt in _FORMATS.items())
        raise EngineError(
            f"engine(s) {which} cannot be exported to Triton; these can: {can}. Build one with the recipe "
            f"target {' or '.join(_FORMATS)}",
            code="not_exportable",
            extra={"engines": [engine.engine_id for engine in refused]},
        )
    _check_names([engine.name for engine in engines])
    files = [file for engine in engines for file in _engine_files(engine)]
    return sorted(files, key=lambda file: file.path)


def write_repository(engines: Sequence[TritonEngine], root: Path) -> list[Path]:
    """Write the repository as a directory under `root` (Triton's `--model-repository`); returns
    the files written, in order."""
    written = []
    for file in plan_repository(engines):
        target = root.joinpath(*PurePosixPath(file.path).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        if file.source is not None:
            shutil.copyfile(file.source, target)
        else:
            target.write_bytes(file.content or b"")
        written.append(target)
    return written


def write_repository_zip(engines: Sequence[TritonEngine], destination: Path) -> Path:
    """Write the repository as a zip at `destination`: members in path order, at one fixed time,
    engine files stored as they are (weights hardly compress, and deflating gigabytes would hold the
    caller for minutes), configs deflated. Every check runs before the file is created; a failure
    while writing removes it."""
    files = plan_repository(engines)
    try:
        with zipfile.ZipFile(destination, "w") as archive:
            for file in files:
                if file.source is not None:
                    info = _zip_info(file.path, zipfile.ZIP_STORED)
                    info.file_size = file.source.stat().st_size  # zip64 when it needs it
                    with file.source.open("rb") as source, archive.open(info, "w") as member:
                        shutil.copyfileobj(source, member, _CHUNK_BYTES)
                else:
                    archive.writestr(_zip_info(file.path, zipfile.ZIP_DEFLATED), file.content or b"")
    except BaseException:
        destination.unlink(missing_ok=True)
        raise
    return destination


# ---------------------------------------------------------------- the parts


def _format(engine: TritonEngine) -> _Format:
    if engine.backend not in _FORMATS:
        raise EngineError(
            f"engine '{engine.engine_id}' ({engine.backend}) cannot be exported to Triton; "
            f"engines of {', '.join(_FORMATS)} can",
            code="not_exportable",
        )
    return _FORMATS[engine.backend]


def _check_names(names: Sequence[str]) -> None:
    bad = [name for name in names if not MODEL_NAME_PATTERN.fullmatch(name)]
    if bad:
        raise EngineError(
            f"model name(s) {bad} cannot name a directory in a model repository: letters, digits, '.', "
            "'_' and '-', starting with a letter or digit, at most 128 characters",
            code="invalid_model_name",
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise EngineError(
            f"model name(s) {repeated} appear more than once; each engine needs its own name in a "
            "repository (its alias, else its id): name each engine once",
            code="duplicate_model_name",
            extra={"names": repeated},
        )


def _engine_files(engine: TritonEngine) -> list[RepositoryFile]:
    fmt = _format(engine)
    if not engine.engine_path.is_file():
        raise EngineError(
            f"engine '{engine.engine_id}': its file '{engine.engine_path.name}' is missing",
            code="engine_file_missing",
        )
    if engine.gpu is not None and not _COMPUTE_CAPABILITY.fullmatch(engine.gpu.compute_capability):
        raise EngineError(
            f"engine '{engine.engine_id}' records compute capability "
            f"'{engine.gpu.compute_capability}', not 'major.minor'",
            code="not_exportable",
        )
    version = f"{engine.name}/{VERSION}"
    files = [
        RepositoryFile(f"{engine.name}/{CONFIG_FILENAME}", content=render_config(engine).encode()),
        RepositoryFile(f"{version}/{fmt.model_filename}", source=engine.engine_path),
    ]
    for suffix, name in fmt.companions:
        companion = engine.engine_path.with_suffix(suffix)
        if not companion.is_file():
            raise EngineError(
                f"engine '{engine.engine_id}': its file '{companion.name}' is missing",
                code="engine_file_missing",
            )
        files.append(RepositoryFile(f"{version}/{name}", source=companion))
    if fmt.model_filename.endswith(".onnx"):
        try:
            locations = external_data_files(engine.engine_path)
        except InvalidModelError:  # its sentences speak of uploads; this is an engine the store holds
            raise EngineError(
                f"engine '{engine.engine_id}': its ONNX file refers to external data that is missing or "
                "outside its directory",
                code="engine_file_missing",
            ) from None
        for location in locations:
            if location == fmt.model_filename:
                raise EngineError(
                    f"engine '{engine.engine_id}' keeps weights in a file named '{location}', the name "
                    "Triton loads the model from",
                    code="not_exportable",
                )
            files.append(RepositoryFile(f"{version}/{location}", source=engine.engine_path.parent / location))
    return files


def external_data_files(onnx_path: Path) -> list[str]:
    """The files an ONNX file keeps tensors in, relative to its directory (checked to be there:
    InvalidModelError otherwise, as for an upload).

    Most engines have none (ONNX Runtime writes them past protobuf's 2 GiB), so the file is parsed
    only when its directory holds other files: a large self-contained engine is not loaded into
    memory to learn that it has none.
    """
    from onnx import TensorProto

    if not any(path.is_file() and path != onnx_path for path in onnx_path.parent.iterdir()):
        return []
    model = load_model_proto(onnx_path)
    if not check_external_data(model, onnx_path.parent):
        return []
    locations = {
        entry.value
        for tensor in all_tensors(model)
        if tensor.data_location == TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return sorted(locations)


def _tensors(kind: str, specs: Sequence[TensorSpec], batched: bool, engine: TritonEngine) -> list[str]:
    """`input [...]` or `output [...]`; dims without the batch dim when Triton batches. A scalar (or
    a batch of scalars) is `dims: [ 1 ]` reshaped to `[ ]`, as Triton wants: dims are never empty."""
    blocks = []
    for spec in specs:
        try:
            datatype = triton_datatype(spec.dtype)
        except EngineError as exc:
            raise EngineError(
                f"engine '{engine.engine_id}': {kind} '{spec.name}': {exc.detail}", code=exc.code
            ) from None
        dims = spec.sample_shape() if batched else spec.shape
        block = [f"    name: {_quote(spec.name)}", f"    data_type: {datatype}"]
        if dims:
            block.append(f"    dims: [ {', '.join(map(str, _dims(dims)))} ]")
        else:
            block += ["    dims: [ 1 ]", "    reshape { shape: [ ] }"]
        blocks.append("\n".join(["  {", *block, "  }"]))
    return [f"{kind} [", ",\n".join(blocks), "]"] if blocks else []


def _dims(dims: Sequence[Dim]) -> list[int]:
    return [dim if isinstance(dim, int) else -1 for dim in dims]


def _comments(engine: TritonEngine) -> list[str]:
    lines = [f"optiforge engine {engine.engine_id}: {engine.backend}, {engine.precision}."]
    if engine.backend == "tensorrt":
        if engine.gpu is None:
            target = "the GPU it was built on was not recorded"
        else:
            model = f"{engine.gpu.gpu_model}, " if engine.gpu.gpu_model else ""
            target = f"built on {model}compute capability {engine.gpu.compute_capability}"
        lines.append(
            f"A TensorRT plan loads only on the GPU architecture and TensorRT version that built it: {target}"
            + (f", with {engine.built_with}." if engine.built_with else ".")
        )
    elif engine.built_with:
        lines.append(
            f"Saved by {engine.built_with}: serve it with Triton's onnxruntime backend of that version "
            "or newer."
        )
    return ["# " + "".join(char if char.isprintable() else " " for char in line) for line in lines]


def _quote(text: str) -> str:
    """A protobuf text-format string: quotes, backslashes and control characters escaped."""

    def escape(char: str) -> str:
        if char in '"\\':
            return "\\" + char
        return f"\\{ord(char):03o}" if ord(char) < 0x20 or ord(char) == 0x7F else char

    return '"' + "".join(map(escape, text)) + '"'


def _zip_info(path: str, compression: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(path, date_time=_ZIP_TIME)
    info.compress_type = compression
    info.create_system = 3  # Unix, whatever the host: the same bytes everywhere
    info.external_attr = 0o644 << 16
    return info
