"""TensorRT (10.x and 11.x) on NVIDIA GPUs: serialized plans built from our ONNX variants.

Written against TensorRT's documented Python API and **not yet run on a GPU** in this project:
TensorRT cannot be installed where it was written (its PyPI packages fetch the real wheels from
NVIDIA's own index), and the GPU machine at hand has no TensorRT either. Every engine says so in
its metadata (`verified_on_hardware: false`) until a `gpu`-marked test has passed on real
hardware. What does not need TensorRT (the optimization profile, the compatibility decision, the
QDQ readiness lint) is plain Python and tested on CPU.

The optimization profile gives TensorRT a range for every dynamic dim: the batch dim covers the
recipe's batch sizes, and a token model's sequence dim (engines.ingest.sequence; the axes and
lengths come in CompileOptions) covers its sequence lengths (`sequence_range` says how). Any
other dynamic dim has no range a recipe could name, and the build is refused.

Precisions follow TensorRT 11, where networks are always strongly typed and the FP16/INT8 builder
flags and implicit calibration are gone: fp32 builds the original ONNX, fp16 an ONNX already in
float16 (our fp16 variant), int8 a QDQ ONNX (our `tensorrt` quantization profile: symmetric,
zero points 0, float bias; the int8 variant builder lints it for TensorRT before it gets here,
engines.variants). A plan is tied to the GPU's compute capability and to the TensorRT
version that built it: both are recorded, and a plan is refused (`engine_incompatible`) on a node
where either differs, instead of failing inside TensorRT.

Device memory comes from PyTorch's CUDA tensors: the GPU worker has torch for the torch-cuda
backend anyway, its caching allocator reuses buffers across calls, and it needs no compiled
extension (pycuda must be built against the local CUDA; cuda-python would work too, with every
allocation and copy managed by hand). An execution context is not thread-safe: the runner keeps
a small pool of contexts, each with its own CUDA stream, and `max_concurrency` is that pool's size.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import Backend, CompileOptions, EngineArtifact, LoadOptions, Runner
from engines.errors import EngineError, InvalidInputError
from engines.hardware import cpu_info, cuda_usable, gpu_info, nvidia_device_present
from engines.ingest.sequence import sequence_axes
from engines.ingest.signature import StatedAxes, TensorSpec, decide_batch_axes

ENGINE_FILENAME = "engine.plan"
PLAN_INFO_FILENAME = "tensorrt_plan.json"
#: Until a gpu-marked test passes on a GPU with TensorRT, every engine says it was not verified.
VERIFIED_ON_HARDWARE = False
DEFAULT_WORKSPACE_BYTES = 4 << 30


# ---------------------------------------------------------------- pure parts (tested on CPU)


#: (min, opt, max) of one dim, or of one input's whole shape.
Range = tuple[int, int, int]
Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def sequence_range(lengths: Sequence[int], longest: int | None = None) -> Range:
    """(min, opt, max) of a sequence dim in TensorRT's profile, from the lengths the engine is timed
    at (CompileOptions.sequence_lengths) and the longest it must take (`longest`, a dataset run at
    its own length; None: the longest timed one).

    - **opt: the middle timed length** (the upper of the two middle ones for an even count).
      TensorRT times its kernels at opt only and runs every other length of the range with them,
      so opt should be the length met most often. A recipe times each of its lengths alike, so
      none is more common than another, and the middle one keeps every timed length nearest to the
      tuned shape; of two middle ones, the longer, whose latency is the larger in absolute terms.
      A search objective names one length (auto-optimize times at that length alone), which is
      then opt.
    - **min: 1**, not the shortest timed length: a served engine gets what a tokenizer gives (a
      batch padded to its longest sentence, often shorter than any timed length). TensorRT tunes
      at opt and sizes activation memory for max, so the lower bound costs no memory; lengths
      below the shortest timed one are not timed here, as no length the recipe did not name is.
    - **max: the longest length** timed or run (activation memory is sized for it).
    """
    timed = sorted({int(length) for length in lengths})
    if not timed and longest is None:
        raise ValueError("a sequence range needs a length")
    high = max([*timed, *([] if longest is None else [int(longest)])])
    opt = timed[len(timed) // 2] if timed else high
    return 1, opt, high


def optimization_profile(inputs: Sequence[TensorSpec], options: CompileOptions) -> dict[str, Shapes]:
    """min/opt/max shapes per input: the batch dim covers `options.batch_sizes` (opt: the largest,
    which is what a batching server mostly runs), a sequence dim (`options.sequence_axes`) the
    sequence lengths (`sequence_range`), a static dim is itself. TensorRT needs a range for every
    dynamic dim, and a recipe names none but these two, so any other dynamic dim is refused."""
    profile: dict[str, Shapes] = {}
    low, high = min(options.batch_sizes), max(options.batch_sizes)
    for spec in inputs:
        dims: list[Range] = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                dims.append((dim, dim, dim))
            elif axis == spec.batch_axis:
                dims.append((low, high, high))
            elif axis == options.sequence_axes.get(spec.name):
                dims.append(_sequence_dim(spec.name, axis, options))
            else:
                raise EngineError(
                    f"input '{spec.name}' has a dynamic dim at axis {axis} besides the batch and the "
                    "sequence; a TensorRT engine needs a range for it: export the model with that dim fixed",
                    code="tensorrt_dynamic_dims",
                )
        profile[spec.name] = tuple(tuple(dim[i] for dim in dims) for i in range(3))  # type: ignore[assignment]
    return profile


def _sequence_dim(name: str, axis: int, options: CompileOptions) -> Range:
    if not options.sequence_lengths and options.max_sequence_length is None:
        raise EngineError(
            f"input '{name}' has a dynamic sequence dim at axis {axis} and no sequence length was named; "
            "a TensorRT engine needs a range for it: ask for sequence_lengths (e.g. [128])",
            code="tensorrt_dynamic_dims",
        )
    return sequence_range(options.sequence_lengths, options.max_sequence_length)


def profile_axes(onnx_path: Path, options: CompileOptions) -> dict[str, int]:
    """The sequence axes the profile shapes: `options.sequence_axes` (the pipeline's, from the
    model's own input specs), or, for a caller that named none, engines.ingest.sequence's rule over
    the ONNX file's signature (TensorRT's parsed network has lost the symbolic dim names the rule
    matches a float mask by)."""
    if options.sequence_axes:
        return dict(options.sequence_axes)
    from engines.ingest.model import onnx_signature

    return sequence_axes(decide_batch_axes(*onnx_signature(onnx_path), options.batch_axes)[0])


def profile_metadata(shapes: Mapping[str, Shapes], options: CompileOptions) -> dict[str, Any]:
    """The profile as an engine's metadata states it: shapes per input, and for a token model the
    sequence axes, the timed lengths and the sequence dim's (min, opt, max)."""
    metadata: dict[str, Any] = {
        "optimization_profile": {name: [list(shape) for shape in value] for name, value in shapes.items()}
    }
    ranged = {name: axis for name, axis in options.sequence_axes.items() if name in shapes}
    if ranged:
        name, axis = next(iter(ranged.items()))
        metadata["sequence_profile"] = {
            "axes": ranged,
            "timed_lengths": sorted(set(options.sequence_lengths)),
            "min": shapes[name][0][axis],
            "opt": shapes[name][1][axis],
            "max": shapes[name][2][axis],
        }
    return metadata


def outside_profile(name: str, shape: tuple[int, ...], profile: Mapping[str, Any]) -> str:
    """The sentence for a shape TensorRT refused (`set_input_shape` is False outside the profile):
    the range the plan was built for, and what to do."""
    low, _opt, high = profile.get(name) or ((), (), ())
    return (
        f"input '{name}' of shape {list(shape)} is outside the range this TensorRT engine was built for "
        f"(from {list(low)} to {list(high)}): send a shape in that range, or build the engine with "
        "batch_sizes and sequence_lengths that cover it"
    )


@dataclass(frozen=True)
class PlanInfo:
    """What a plan is tied to, written beside it when it is built."""

    tensorrt: str
    compute_capability: str
    gpu_model: str
    precision: str
    profile: dict[str, Any]

    def write(self, engine_dir: Path) -> None:
        (engine_dir / PLAN_INFO_FILENAME).write_text(json.dumps(self.__dict__))

    @classmethod
    def read(cls, engine_dir: Path) -> PlanInfo:
        return cls(**json.loads((engine_dir / PLAN_INFO_FILENAME).read_text()))


def incompatibility(plan: PlanInfo, tensorrt_version: str, compute_capability: str) -> str | None:
    """Why this node cannot load the plan (TensorRT refuses plans from another version or GPU
    architecture), or None. Versions must match to the minor (10.x plans do not load in 11)."""
    built_version = ".".join(plan.tensorrt.split(".")[:2])
    here_version = ".".join(tensorrt_version.split(".")[:2])
    if built_version != here_version:
        return (
            f"the plan was built by TensorRT {plan.tensorrt} and this node has {tensorrt_version}: "
            "rebuild the engine on a worker with this node's TensorRT"
        )
    if plan.compute_capability != compute_capability:
        return (
            f"the plan was built for compute capability {plan.compute_capability} ({plan.gpu_model}) and "
            f"this GPU is {compute_capability}: rebuild the engine on a worker with this GPU model"
        )
    return None


# ---------------------------------------------------------------- TensorRT itself (GPU only)


@cache
def _trt() -> Any:
    import tensorrt

    return tensorrt


def _logger() -> Any:
    trt = _trt()
    return trt.Logger(trt.Logger.WARNING)


def _network_flags(trt: Any) -> int:
    """Strongly typed (TensorRT 10 needs the flag so an fp16 ONNX builds in fp16; 11 is always so)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _parse(trt: Any, builder: Any, onnx_path: Path) -> Any:
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, _logger())
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = [str(parser.get_error(index)) for index in range(parser.num_errors)]
        raise EngineError(
            "TensorRT's ONNX parser refused the model: " + "; ".join(errors[:5]), code="tensorrt_parse_failed"
        )
    return network, parser


def _input_specs(network: Any, stated: StatedAxes) -> list[TensorSpec]:
    from engines.ingest.signature import normalize_dim

    specs = []
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        dtype = np.dtype(_trt().nptype(tensor.dtype)).name
        specs.append(TensorSpec(tensor.name, dtype, tuple(normalize_dim(dim) for dim in tensor.shape)))
    return decide_batch_axes(specs, [], stated)[0]


@dataclass(frozen=True)
class TensorRtLoadOptions(LoadOptions):
    #: Execution contexts (one per concurrent call; each holds its activation memory).
    contexts: int = 2
    device_index: int = 0


class TensorRtRunner(Runner):
    """A deserialized plan with a pool of execution contexts (one call per context at a time)."""

    def __init__(self, engine_path: Path, options: TensorRtLoadOptions):
        super().__init__()
        self._path, self._options = engine_path, options
        self.max_concurrency = options.contexts  # type: ignore[misc]
        self._engine: Any = None
        self._contexts: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._profile: dict[str, Any] = {}  # input name -> [min, opt, max] shapes, as built

    def _activate(self) -> None:
        import torch

        trt = _trt()
        plan = PlanInfo.read(self._path.parent)
        here = gpu_compute_capability(self._options.device_index)
        reason = incompatibility(plan, trt.__version__, here)
        if reason is not None:
            raise EngineError(reason, code="engine_incompatible")
        self._profile = plan.profile
        torch.cuda.set_device(self._options.device_index)
        runtime = trt.Runtime(_logger())
        self._engine = runtime.deserialize_cuda_engine(self._path.read_bytes())
        if self._engine is None:
            raise EngineError("TensorRT could not deserialize the plan", code="engine_incompatible")
        self._inputs, self._outputs = self._signature()
        for _ in range(self._options.contexts):
            self._contexts.put((self._engine.create_execution_context(), torch.cuda.Stream()))

    def _signature(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        from engines.ingest.signature import normalize_dim

        trt = _trt()
        inputs, outputs = [], []
        for index in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(index)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))).name
            shape = tuple(normalize_dim(dim) for dim in self._engine.get_tensor_shape(name))
            spec = TensorSpec(name, dtype, shape)
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(spec)
        return decide_batch_axes(inputs, outputs, self._options.batch_axes)

    def _deactivate(self) -> None:
        self._contexts = queue.Queue()
        self._engine = None

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        context, stream = self._contexts.get()
        try:
            device = torch.device("cuda", self._options.device_index)
            keep = []  # device buffers stay referenced until the stream is done with them
            for spec in self._inputs:
                tensor = torch.from_numpy(np.ascontiguousarray(feeds[spec.name])).to(device)
                if not context.set_input_shape(spec.name, tuple(tensor.shape)):
                    raise InvalidInputError(outside_profile(spec.name, tuple(tensor.shape), self._profile))
                context.set_tensor_address(spec.name, tensor.data_ptr())
                keep.append(tensor)
            outputs = {}
            for spec in self._outputs:
                shape = tuple(context.get_tensor_shape(spec.name))
                dtype = getattr(torch, spec.dtype)
                outputs[spec.name] = torch.empty(shape, dtype=dtype, device=device)
                context.set_tensor_address(spec.name, outputs[spec.name].data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise EngineError("TensorRT failed to run these inputs", code="inference_failed")
            stream.synchronize()
            return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}
        finally:
            self._contexts.put((context, stream))

    def input_metadata(self) -> list[TensorSpec]:
        return list(self._inputs)

    def output_metadata(self) -> list[TensorSpec]:
        return list(self._outputs)


class TensorRtBackend(Backend):
    name = "tensorrt"
    queue = "gpu"
    quantization_profile = "tensorrt"
    precisions = ("fp32", "fp16", "int8")
    load_options = TensorRtLoadOptions

    @classmethod
    def available(cls) -> bool:
        return (
            nvidia_device_present()
            and all(importlib.util.find_spec(name) is not None for name in ("tensorrt", "torch"))
            and cuda_usable()
        )

    def compile(self, onnx_path: Path, out_dir: Path, options: CompileOptions) -> EngineArtifact:
        trt = _trt()
        out_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        builder = trt.Builder(_logger())
        network, _parser = _parse(trt, builder, onnx_path)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, DEFAULT_WORKSPACE_BYTES)
        options = replace(options, sequence_axes=profile_axes(onnx_path, options))
        shapes = optimization_profile(_input_specs(network, options.batch_axes), options)
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(
                "TensorRT could not build an engine from this model (see the worker's log)",
                code="tensorrt_build_failed",
            )
        engine_path = out_dir / ENGINE_FILENAME
        engine_path.write_bytes(bytes(serialized))
        gpu = gpu_identity()
        plan = PlanInfo(
            trt.__version__, gpu["compute_capability"], gpu["gpu_model"], options.precision, shapes
        )
        plan.write(out_dir)
        return EngineArtifact(
            backend=self.name,
            precision=options.precision,
            path=engine_path,
            build_seconds=time.perf_counter() - started,
            metadata={
                "tensorrt": trt.__version__,
                "compute_capability": plan.compute_capability,
                "gpu_model": plan.gpu_model,
                **profile_metadata(shapes, options),
                "verified_on_hardware": VERIFIED_ON_HARDWARE,
            },
        )

    def load(self, engine_path: Path, options: LoadOptions | None = None) -> TensorRtRunner:
        options = self.load_options_for(options)
        return TensorRtRunner(engine_path, options).activate()  # type: ignore[return-value]

    def hardware(self, threads: int | None = None) -> dict[str, Any]:
        return {**cpu_info(), **gpu_info(), "tensorrt": _trt().__version__}


def gpu_identity(device_index: int = 0) -> dict[str, str]:
    info = gpu_info(device_index)
    return {"gpu_model": info["gpu_model"], "compute_capability": info["compute_capability"]}


def gpu_compute_capability(device_index: int = 0) -> str:
    return gpu_identity(device_index)["compute_capability"]
