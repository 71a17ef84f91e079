"""PyTorch as a backend: the ONNX model converted to a `torch.fx` module (onnx2torch) and run by
PyTorch, on the CPU (`torch-cpu`) or an NVIDIA GPU (`torch-cuda`).

Why a PyTorch backend in an ONNX service: `torch-cpu` is what a user would otherwise run, so a
job that builds it measures the alternative side by side with ONNX Runtime on the same machine;
`torch-cuda` is the GPU path that runs wherever PyTorch has CUDA (TensorRT needs NVIDIA's own
index, which many clusters, and the machines this was written on, cannot reach).

The engine file is the ONNX model itself (`engine.onnx`, converted again at load: a converted
module is code, and pickling code is what this service never loads), with `torch_engine.json`
beside it: the device, the precision, the shapes whose CUDA graphs are captured at load and
whether `torch.compile` is used. fp16 and bf16 are applied here to the fp32 model (weights cast,
float inputs cast in and outputs cast back to float32), not taken from an fp16 ONNX: PyTorch's
own autocasting rules would fight a graph full of Casts. CUDA graphs replay a whole forward pass
as one launch for the shapes the recipe times (inputs copied into captured buffers): each batch
size, and for a token model each (batch size, sequence length), the sequence axes coming in
CompileOptions. Any other shape, and one whose capture fails at load (a converted graph that reads
a shape on the host cannot be captured), runs eagerly; the metadata says so. `torch.compile` is
tried on CUDA at build time, timed against eager at the largest timed shape, and kept only when
faster; a failure falls back to eager with the reason in the metadata.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from engines.backends.base import Backend, CompileOptions, EngineArtifact, LoadOptions, Runner
from engines.errors import EngineError
from engines.hardware import (
    bf16_unsupported,
    cpu_hardware,
    cpu_info,
    cuda_usable,
    gpu_info,
    nvidia_device_present,
)
from engines.ingest.model import onnx_signature
from engines.ingest.sequence import sequence_axes
from engines.ingest.signature import TensorSpec, decide_batch_axes

ENGINE_FILENAME = "engine.onnx"
SETTINGS_FILENAME = "torch_engine.json"
#: Torch dtypes by precision name; the float32 I/O of the engine is cast to these inside.
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: What has run on real hardware (the README's GPU section says where): kept in every engine's
#: metadata so nobody mistakes code written to an API for code that was run.
VERIFIED_ON_HARDWARE = {"torch-cpu": True, "torch-cuda": False}
#: What an engine's metadata says of the shapes without a captured CUDA graph.
UNCAPTURED_SHAPES = (
    "eager: a shape besides each cuda_graph_batch_sizes at each cuda_graph_sequence_lengths, or one "
    "whose capture fails at load, runs the module without a CUDA graph"
)


@dataclass(frozen=True)
class TorchEngineSettings:
    """What `torch_engine.json` holds: enough to rebuild the runner from the ONNX file."""

    device: str  # "cpu" or "cuda"
    precision: str
    cuda_graph_batch_sizes: tuple[int, ...] = ()
    compile: bool = False
    notes: tuple[str, ...] = ()
    #: A token model's graphs are captured at each batch size and each of these lengths (empty: at
    #: the batch sizes alone), along `sequence_axes` (input name -> its sequence axis).
    cuda_graph_sequence_lengths: tuple[int, ...] = ()
    sequence_axes: dict[str, int] = field(default_factory=dict)

    @property
    def cuda_graph_shapes(self) -> list[tuple[int, int | None]]:
        """(batch size, sequence length or None) of every CUDA graph captured at load."""
        lengths: tuple[int | None, ...] = self.cuda_graph_sequence_lengths or (None,)
        return [(size, length) for size in self.cuda_graph_batch_sizes for length in lengths]

    def write(self, engine_dir: Path) -> None:
        (engine_dir / SETTINGS_FILENAME).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, engine_dir: Path) -> TorchEngineSettings:
        data = json.loads((engine_dir / SETTINGS_FILENAME).read_text())
        data["cuda_graph_batch_sizes"] = tuple(data.get("cuda_graph_batch_sizes", ()))
        data["notes"] = tuple(data.get("notes", ()))
        data["cuda_graph_sequence_lengths"] = tuple(data.get("cuda_graph_sequence_lengths", ()))
        data["sequence_axes"] = {name: int(axis) for name, axis in (data.get("sequence_axes") or {}).items()}
        return cls(**data)


@dataclass(frozen=True)
class TorchLoadOptions(LoadOptions):
    #: torch's intra-op threads (process-wide in PyTorch: the last load sets them); None: torch's default.
    threads: int | None = None
    #: The CUDA device index for torch-cuda.
    device_index: int = 0


def graph_shapes(
    inputs: list[TensorSpec], batch_size: int, length: int | None, axes: Mapping[str, int]
) -> list[tuple[int, ...]] | None:
    """Every input's shape at `batch_size` (and at sequence `length` along `axes`, the inputs'
    sequence axes): what one CUDA graph is captured at, or a trial run fed. None when a dim besides
    the batch and the sequence is dynamic (there is no one shape to make up for it)."""
    shapes = []
    for spec in inputs:
        axis = None if length is None else axes.get(spec.name)
        if axis is not None:
            spec = replace(
                spec, shape=tuple(length if index == axis else dim for index, dim in enumerate(spec.shape))
            )
        shape = spec.shape_at(batch_size)
        if shape is None:
            return None
        shapes.append(shape)
    return shapes


def _where(batch_size: int, length: int | None) -> str:
    """A shape as notes name it: `batch 8`, `batch 8, sequence 128`."""
    return f"batch {batch_size}" + ("" if length is None else f", sequence {length}")


class TorchRunner(Runner):
    """A converted module on one device at one precision, with CUDA graphs for the timed shapes.

    One call at a time on CUDA (captured graphs share their input and output buffers); any number
    on the CPU (a module in eval mode under `inference_mode` keeps no state between calls).
    """

    def __init__(self, engine_path: Path, settings: TorchEngineSettings, options: TorchLoadOptions):
        super().__init__()
        self._path, self.settings, self._options = engine_path, settings, options
        self._inputs, self._outputs = decide_batch_axes(*onnx_signature(engine_path), options.batch_axes)
        self._module: Any = None
        self._graphs: dict[tuple[tuple[int, ...], ...], tuple[Any, list[Any], list[Any]]] = {}
        self.notes: list[str] = list(settings.notes)

    @property
    def max_concurrency(self) -> int | None:  # type: ignore[override]
        return 1 if self.settings.device == "cuda" else None

    def _device(self) -> Any:
        import torch

        if self.settings.device == "cuda":
            return torch.device("cuda", self._options.device_index)
        return torch.device("cpu")

    def _activate(self) -> None:
        import torch

        from engines.torch_bridge import onnx_to_torch

        if self._options.threads and self.settings.device == "cpu":
            torch.set_num_threads(self._options.threads)
        module = onnx_to_torch(self._path, purpose=f"the torch-{self.settings.device} backend").eval()
        module = module.to(self._device())
        dtype = getattr(torch, TORCH_DTYPES[self.settings.precision])
        if dtype != torch.float32:
            module = module.to(dtype)
        if self.settings.compile:
            module = torch.compile(module)
        self._module = module
        for size, length in self.settings.cuda_graph_shapes:
            self._capture(size, length)

    def _deactivate(self) -> None:
        self._module, self._graphs = None, {}
        if self.settings.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _cast_in(self, array: np.ndarray) -> Any:
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self._device())
        if tensor.is_floating_point():
            tensor = tensor.to(getattr(torch, TORCH_DTYPES[self.settings.precision]))
        return tensor

    def _forward(self, tensors: list[Any]) -> list[Any]:
        result = self._module(*tensors)
        return list(result) if isinstance(result, list | tuple) else [result]

    def _capture(self, batch_size: int, length: int | None = None) -> None:
        """Record one forward pass at `batch_size` (and sequence `length`) as a CUDA graph, after
        warm-up on a side stream as PyTorch's documentation prescribes. Zeros feed the capture: a
        valid token id (the pad id), mask and token type. A shape that cannot be captured is noted
        and runs eagerly: the engine still serves it."""
        import torch

        where = _where(batch_size, length)
        shapes = graph_shapes(self._inputs, batch_size, length, self.settings.sequence_axes)
        if shapes is None:
            self.notes.append(f"no CUDA graph at {where}: an input has a dynamic dim no recipe sizes")
            return
        try:
            static_in = [
                self._cast_in(np.zeros(shape, dtype=spec.dtype))
                for spec, shape in zip(self._inputs, shapes, strict=True)
            ]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.inference_mode(), torch.cuda.stream(stream):
                for _ in range(3):
                    self._forward(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                static_out = self._forward(static_in)
        except Exception as exc:  # a host sync inside the converted graph, an op capture forbids
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
            self.notes.append(f"no CUDA graph at {where}, it runs eagerly: {reason}")
            return
        self._graphs[tuple(shapes)] = (graph, static_in, static_out)

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        arrays = [feeds[spec.name] for spec in self._inputs]
        try:
            with torch.inference_mode():
                captured = self._graphs.get(tuple(array.shape for array in arrays))
                if captured is not None:
                    graph, static_in, outputs = captured
                    for buffer, array in zip(static_in, arrays, strict=True):
                        buffer.copy_(torch.from_numpy(np.ascontiguousarray(array)))
                    graph.replay()
                else:
                    outputs = self._forward([self._cast_in(array) for array in arrays])
                results = [self._to_numpy(tensor) for tensor in outputs]
        except Exception as exc:  # a shape the converted graph cannot take, a dtype it did not expect
            raise EngineError(f"PyTorch failed on these inputs: {exc}", code="inference_failed") from exc
        return {spec.name: result for spec, result in zip(self._outputs, results, strict=True)}

    @staticmethod
    def _to_numpy(tensor: Any) -> np.ndarray:
        import torch

        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor = tensor.float()
        return tensor.detach().cpu().numpy()  # a copy: a graph's output buffer is reused

    def input_metadata(self) -> list[TensorSpec]:
        return list(self._inputs)

    def output_metadata(self) -> list[TensorSpec]:
        return list(self._outputs)


class _TorchBackend(Backend):
    """What torch-cpu and torch-cuda share; they differ in device, precisions and graph capture."""

    device: ClassVar[str]
    load_options = TorchLoadOptions
    native_precisions = frozenset({"fp16", "bf16"})

    @classmethod
    def _libraries_present(cls) -> bool:
        return all(importlib.util.find_spec(name) is not None for name in ("torch", "onnx2torch"))

    def compile(self, onnx_path: Path, out_dir: Path, options: CompileOptions) -> EngineArtifact:
        """Copy the model, convert it once to prove it converts and runs at this precision, and decide
        the CUDA graphs and torch.compile (CUDA): what the engine's settings file records."""
        unavailable = self.precision_unavailable(options.precision)
        if unavailable is not None:
            raise EngineError(unavailable, code="precision_not_supported")
        out_dir.mkdir(parents=True, exist_ok=True)
        engine_path = out_dir / ENGINE_FILENAME
        for source in [onnx_path, *onnx_path.parent.glob(onnx_path.name + ".data")]:
            shutil.copyfile(source, out_dir / source.name.replace(onnx_path.name, ENGINE_FILENAME, 1))
        _rewrite_external_data_location(engine_path, onnx_path.name)
        started = time.perf_counter()
        settings = self._settings(engine_path, options)
        settings.write(out_dir)
        return EngineArtifact(
            backend=self.name,
            precision=options.precision,
            path=engine_path,
            build_seconds=time.perf_counter() - started,
            metadata={
                **self._versions(),
                "device": settings.device,
                "cuda_graph_batch_sizes": list(settings.cuda_graph_batch_sizes),
                **(
                    {"cuda_graph_sequence_lengths": list(settings.cuda_graph_sequence_lengths)}
                    if settings.sequence_axes
                    else {}
                ),
                **({"uncaptured_shapes": UNCAPTURED_SHAPES} if settings.device == "cuda" else {}),
                **({"sequence_axes": dict(settings.sequence_axes)} if settings.sequence_axes else {}),
                "torch_compile": settings.compile,
                "notes": list(settings.notes),
                "verified_on_hardware": VERIFIED_ON_HARDWARE[self.name],
            },
        )

    def _settings(self, engine_path: Path, options: CompileOptions) -> TorchEngineSettings:
        """The engine's settings, after a trial run at the largest batch (and, for a token model, the
        longest timed sequence): an op the precision breaks is an EngineError here, at build time, not at
        the first request. The sequence axes are `options.sequence_axes`, or, for a caller that named
        none, engines.ingest.sequence's rule over the engine's own input specs."""
        eager = TorchEngineSettings(self.device, options.precision)
        runner = TorchRunner(
            engine_path, eager, self.load_options(threads=options.threads, batch_axes=options.batch_axes)
        ).activate()
        try:
            axes = dict(options.sequence_axes) or sequence_axes(runner.input_metadata())
            eager = replace(eager, sequence_axes=axes)
            length = _longest(options) if axes else None
            seconds = _trial_seconds(runner, max(options.batch_sizes), length, axes)
        finally:
            runner.deactivate()
        if seconds is None:
            return replace(eager, notes=(_UNTRIED,))
        return self._tuned(engine_path, options, eager, seconds)

    def _tuned(
        self, engine_path: Path, options: CompileOptions, eager: TorchEngineSettings, eager_seconds: float
    ) -> TorchEngineSettings:
        """On the CPU: eager, as it is (torch.compile on a CPU needs a C++ toolchain and minutes)."""
        return eager

    @staticmethod
    def _versions() -> dict[str, Any]:
        import torch

        return {"torch": torch.__version__, "onnx2torch": _package_version("onnx2torch")}

    def load(self, engine_path: Path, options: LoadOptions | None = None) -> TorchRunner:
        options = self.load_options_for(options)
        settings = TorchEngineSettings.read(engine_path.parent)
        runner = TorchRunner(engine_path, settings, options)  # type: ignore[arg-type]
        return runner.activate()  # type: ignore[return-value]


class TorchCpuBackend(_TorchBackend):
    name = "torch-cpu"
    queue = "cpu"
    device = "cpu"
    precisions = ("fp32", "bf16")  # bf16 where the CPU has bfloat16 arithmetic (precision_unavailable)

    @classmethod
    def precision_unavailable(cls, precision: str) -> str | None:
        return bf16_unsupported(cpu_info()["cpu_features"]) if precision == "bf16" else None

    @classmethod
    def available(cls) -> bool:
        return cls._libraries_present()

    def hardware(self, threads: int | None = None) -> dict[str, Any]:
        return cpu_hardware(threads, **self._versions())


class TorchCudaBackend(_TorchBackend):
    name = "torch-cuda"
    queue = "gpu"
    device = "cuda"
    precisions = ("fp32", "fp16", "bf16")

    @classmethod
    def available(cls) -> bool:
        return cls._libraries_present() and nvidia_device_present() and cuda_usable()

    def _tuned(
        self, engine_path: Path, options: CompileOptions, eager: TorchEngineSettings, eager_seconds: float
    ) -> TorchEngineSettings:
        """CUDA graphs for every timed shape of the recipe (each batch size, at each sequence length
        for a token model); torch.compile when it is faster at the largest of them."""
        notes = list(eager.notes)
        compiled = replace(eager, compile=True)
        runner = TorchRunner(engine_path, compiled, self.load_options(batch_axes=options.batch_axes))
        length = _longest(options) if eager.sequence_axes else None
        where = _where(max(options.batch_sizes), length)
        try:
            runner.activate()
            compiled_seconds = _trial_seconds(runner, max(options.batch_sizes), length, eager.sequence_axes)
        except Exception as exc:  # inductor and dynamo fail in many ways on converted graphs
            compiled_seconds = None
            notes.append(f"torch.compile failed, eager is used: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            runner.deactivate()
        use_compile = compiled_seconds is not None and compiled_seconds < 0.95 * eager_seconds
        if compiled_seconds is not None:
            verdict = "kept" if use_compile else "not kept"
            notes.append(
                f"torch.compile {verdict}: {compiled_seconds * 1e3:.3f} ms vs eager "
                f"{eager_seconds * 1e3:.3f} ms at {where}"
            )
        lengths = tuple(sorted(set(options.sequence_lengths))) if eager.sequence_axes else ()
        return replace(
            eager,
            compile=use_compile,
            cuda_graph_batch_sizes=tuple(options.batch_sizes),
            cuda_graph_sequence_lengths=lengths,
            notes=tuple(notes),
        )

    def hardware(self, threads: int | None = None) -> dict[str, Any]:
        return {**cpu_info(), **gpu_info(), **self._versions()}


#: The note of an engine whose shape could not be tried at build.
_UNTRIED = (
    "not tried at build (so, on CUDA, no CUDA graphs and no torch.compile): an input has dynamic dims "
    "besides the batch, and no sequence length was named for them"
)


def _longest(options: CompileOptions) -> int | None:
    """The longest sequence the engine is timed at (the longest it runs when none is timed; None:
    none named): the trial run's, and torch.compile's timing's, length."""
    return max(options.sequence_lengths, default=options.max_sequence_length)


def _trial_seconds(
    runner: TorchRunner,
    batch_size: int,
    length: int | None = None,
    axes: Mapping[str, int] | None = None,
    runs: int = 5,
) -> float | None:
    """Median seconds of a few forward passes at `batch_size` (and sequence `length` along `axes`;
    zeros are valid token ids, masks and types), None when a dim besides the batch and the sequence
    is dynamic (there is no shape to try); raises EngineError when the module cannot run."""
    shapes = graph_shapes(runner.input_metadata(), batch_size, length, axes or {})
    if shapes is None:
        return None
    feeds = {
        spec.name: np.zeros(shape, dtype=spec.dtype)
        for spec, shape in zip(runner.input_metadata(), shapes, strict=True)
    }
    timings = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        runner.infer(feeds, check_inputs=False)
        timings.append(time.perf_counter() - started)
    return float(np.median(timings[1:]))


def _rewrite_external_data_location(engine_path: Path, original_name: str) -> None:
    """An ONNX file with external data names its data file: follow the copy's new name."""
    import onnx

    model = onnx.load(str(engine_path), load_external_data=False)
    changed = False
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value.startswith(original_name):
                entry.value = entry.value.replace(original_name, ENGINE_FILENAME, 1)
                changed = True
    if changed:
        onnx.save(model, str(engine_path))


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
