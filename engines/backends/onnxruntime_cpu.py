"""ONNX Runtime on CPU: always present, the backend every engine can fall back to.

Compile saves the graph after ONNX Runtime's *extended* optimizations (fusions that are valid
on any CPU); the hardware-specific layout passes run again at load time, so an engine file stays
portable between x86 machines while the session still gets every optimization.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import Backend, CompileOptions, EngineArtifact, LoadOptions, Runner
from engines.errors import EngineError
from engines.hardware import cpu_hardware
from engines.ingest.model import PROTOBUF_LIMIT_BYTES
from engines.ingest.signature import TensorSpec, decide_batch_axes, normalize_dim

ENGINE_FILENAME = "engine.onnx"


def _session(path: Path, options: Any) -> Any:
    """An InferenceSession, with load failures (unsupported ops, bad graphs) as a clear EngineError."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        raise EngineError(
            f"ONNX Runtime cannot run this model: {exc}".strip(), code="model_not_runnable"
        ) from exc


def _session_options(
    threads: int | None, level_name: str, spin_wait: bool = True, memory_arena: bool = True
) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = memory_arena
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level_name)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin_wait:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _spec(node_arg: Any) -> TensorSpec:
    type_name = node_arg.type  # e.g. "tensor(float)"
    element = type_name[len("tensor(") : -1] if type_name.startswith("tensor(") else type_name
    dtype = {"float": "float32", "double": "float64", "float16": "float16"}.get(element, element)
    return TensorSpec(name=node_arg.name, dtype=dtype, shape=tuple(map(normalize_dim, node_arg.shape)))


@dataclass(frozen=True)
class OnnxRuntimeLoadOptions(LoadOptions):
    threads: int | None = None  # None: all cores
    #: Spinning idle threads: the lowest latency for back-to-back calls (what a benchmark does), but
    #: they take cores a server's own threads need, so serving turns it off.
    spin_wait: bool = True
    #: ONNX Runtime's CPU memory arena keeps the most its session ever took (it grows by doubling
    #: and never shrinks): 3.0 GB after two batches of 15 000 digits, whose engine call peaks at
    #: 1.3 GB without it. Small batches run as fast without it (within noise, measured on the
    #: digits CNN at batch 1 and 8), so serving turns it off; timing loops keep the default.
    memory_arena: bool = True


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime session; `InferenceSession.run` is thread-safe, so no concurrency limit."""

    def __init__(self, engine_path: Path, options: OnnxRuntimeLoadOptions):
        super().__init__()
        self._path, self._options = engine_path, options
        self._session: Any = None
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._output_names: list[str] = []

    def _activate(self) -> None:
        options = _session_options(
            self._options.threads, "ORT_ENABLE_ALL", self._options.spin_wait, self._options.memory_arena
        )
        self._session = _session(self._path, options)
        self._inputs, self._outputs = decide_batch_axes(
            [_spec(arg) for arg in self._session.get_inputs()],
            [_spec(arg) for arg in self._session.get_outputs()],
            self._options.batch_axes,
        )
        self._output_names = [spec.name for spec in self._outputs]

    def _deactivate(self) -> None:
        self._session = None  # the session's memory goes with its last reference

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self._session.run(self._output_names, dict(feeds))
        except Exception as exc:  # e.g. a Reshape that the given shapes cannot satisfy
            raise EngineError(f"ONNX Runtime failed on these inputs: {exc}", code="inference_failed") from exc
        return dict(zip(self._output_names, results, strict=True))

    def input_metadata(self) -> list[TensorSpec]:
        return list(self._inputs)

    def output_metadata(self) -> list[TensorSpec]:
        return list(self._outputs)


class OnnxRuntimeCpuBackend(Backend):
    name = "onnxruntime-cpu"
    queue = "cpu"
    # int8-dynamic: MatMulInteger/DynamicQuantizeLinear; int4/int8-weight: com.microsoft MatMulNBits
    precisions = ("fp32", "fp16", "int8", "int8-dynamic", "int4-weight", "int8-weight")
    load_options = OnnxRuntimeLoadOptions

    @classmethod
    def available(cls) -> bool:
        try:
            import onnxruntime as ort
        except ImportError:
            return False
        return "CPUExecutionProvider" in ort.get_available_providers()

    def compile(self, onnx_path: Path, out_dir: Path, options: CompileOptions) -> EngineArtifact:
        import onnxruntime as ort

        out_dir.mkdir(parents=True, exist_ok=True)
        engine_path = out_dir / ENGINE_FILENAME
        session_options = _session_options(options.threads, "ORT_ENABLE_EXTENDED")
        session_options.optimized_model_filepath = str(engine_path)
        if onnx_path.stat().st_size + _external_data_size(onnx_path) >= PROTOBUF_LIMIT_BYTES:
            session_options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", ENGINE_FILENAME + ".data"
            )
        started = time.perf_counter()
        _session(onnx_path, session_options)
        build_seconds = time.perf_counter() - started
        return EngineArtifact(
            backend=self.name,
            precision=options.precision,
            path=engine_path,
            build_seconds=build_seconds,
            metadata={"onnxruntime": ort.__version__, "saved_optimization_level": "extended"},
        )

    def load(self, engine_path: Path, options: LoadOptions | None = None) -> OnnxRuntimeRunner:
        options = self.load_options_for(options)
        return OnnxRuntimeRunner(engine_path, options).activate()  # type: ignore[return-value]

    def hardware(self, threads: int | None = None) -> dict[str, Any]:
        import onnxruntime as ort

        return cpu_hardware(threads, onnxruntime=ort.__version__)


def _external_data_size(onnx_path: Path) -> int:
    return sum(path.stat().st_size for path in onnx_path.parent.glob(onnx_path.name + ".data"))
