"""OpenVINO on the CPU: Intel's runtime, a second CPU backend measured beside ONNX Runtime.

The engine is OpenVINO IR (`engine.xml`, its weights in `engine.bin` beside it), converted once
from the ONNX by OpenVINO's ONNX frontend (ONNX only: a user's file is never offered to the
TensorFlow or Paddle parsers, as `Core.read_model` would when the ONNX parser refuses it). The IR
keeps two things of ours in its runtime info: the ONNX signature (dim names such as `batch` are
lost in IR, and the batch axes are decided from them, as for every backend) and the inference
precision the engine was built for, applied again at every load: OpenVINO's CPU plugin otherwise
picks it per machine, and on a CPU with AVX512_BF16 or AMX its default is bf16 (an "fp32" engine
that was 0.1 off on the digits logits).

Precisions: fp32 computes in f32; int8 is our QDQ model, whose Q/DQ pairs OpenVINO turns into
FakeQuantize and runs in int8 where its low-precision transformations match, f32 elsewhere; fp16
is our fp16 model (fp16 weights in the IR) computed in f16 only where the CPU has f16 arithmetic
(AVX512_FP16, AMX_FP16): elsewhere the plugin would silently swap it for bf16, so it computes in
f32 and the engine's metadata says so.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engines.backends.base import Backend, CompileOptions, EngineArtifact, LoadOptions, Runner
from engines.errors import EngineError
from engines.hardware import bf16_unsupported, cpu_hardware, cpu_info
from engines.ingest.model import onnx_signature
from engines.ingest.signature import TensorSpec, decide_batch_axes

ENGINE_FILENAME = "engine.xml"
#: Where the IR's runtime info keeps what is ours.
RT_INFO_SECTION = "optiforge"
#: OpenVINO's name of the element type each precision computes in, when the CPU can.
#: int8-dynamic (DynamicQuantizeLinear + MatMulInteger) and the weight-only precisions (com.microsoft
#: MatMulNBits, GatherBlockQuantized, which its ONNX frontend reads) keep their integer weights and run
#: the rest in f32; bf16 is the fp32 model computed in bf16 (CPUs with AVX512_BF16 or AMX only).
_INFERENCE_PRECISION = {
    "fp32": "f32",
    "fp16": "f16",
    "bf16": "bf16",
    "int8": "f32",
    "int8-dynamic": "f32",
    "int4-weight": "f32",
    "int8-weight": "f32",
}
#: Where OpenVINO's messages say which C++ line raised: no use to a user.
_SOURCE_LOCATION = re.compile(
    r"(Exception from|Check '.*?' failed at) \S+\.(?:cpp|hpp|h):\d+:|FrontEnd API failed with \w+:"
)
#: The CPU plugin's layers that carry the arithmetic: what "how much of it is int8" counts.
_COMPUTE_LAYERS = {"Convolution", "Deconvolution", "FullyConnected", "MatMul", "GroupConvolution"}


@cache
def _core() -> Any:
    """One OpenVINO Core per process: it is thread-safe, and the CPU plugin it loads is shared."""
    import openvino as ov

    return ov.Core()


def _openvino_sentence(exc: BaseException) -> str:
    """OpenVINO's message without its C++ source locations ("Exception from src/...cpp:84:",
    "Check 'x' failed at ...cpp:77:"): the sentence a user can act on."""
    text = " ".join(_SOURCE_LOCATION.sub(" ", str(exc)).split())
    return text or type(exc).__name__


def _read_onnx(onnx_path: Path) -> Any:
    """The ONNX file as an OpenVINO model (external data is read from beside it)."""
    from openvino.frontend import FrontEndManager

    try:
        frontend = FrontEndManager().load_by_framework("onnx")
        return frontend.convert(frontend.load(str(onnx_path)))
    except Exception as exc:  # OpConversionFailure, GeneralFailure, ...: OpenVINO's own types
        raise EngineError(
            f"OpenVINO cannot read this model: {_openvino_sentence(exc)}", code="model_not_runnable"
        ) from exc


def inference_precision_for(precision: str, capabilities: list[str]) -> tuple[str, str | None]:
    """The inference precision hint for an engine precision on a CPU with these OpenVINO
    OPTIMIZATION_CAPABILITIES, and a note when it is not what the name says."""
    hint = _INFERENCE_PRECISION[precision]
    if hint == "bf16" and "BF16" not in capabilities:
        return "f32", "OpenVINO finds no bf16 arithmetic on this CPU: the bf16 engine computes in f32"
    if hint == "f16" and "FP16" not in capabilities:
        return "f32", (
            "this CPU has no f16 arithmetic OpenVINO uses (AVX512_FP16 or AMX_FP16): the fp16 engine "
            "keeps fp16 weights and computes in f32 (OpenVINO would otherwise swap f16 for bf16)"
        )
    return hint, None


def _check_names(model: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """OpenVINO must keep every ONNX input and output under its name: outputs are keyed by the
    ONNX names, and a renamed one would vanish from a response. (Shapes are not compared: real
    exports declare output shapes that the graph does not produce, and ONNX Runtime runs them.)"""
    for what, ports, specs in (("input", model.inputs, inputs), ("output", model.outputs, outputs)):
        names = {name for port in ports for name in port.get_names()}
        for spec in specs:
            if spec.name not in names:
                raise EngineError(
                    f"OpenVINO renamed or dropped the {what} '{spec.name}' (it has "
                    f"{sorted(port.get_any_name() for port in ports)})",
                    code="model_not_runnable",
                )


def _runtime_precisions(compiled: Any) -> dict[str, int]:
    """How many compute layers (convolutions, fully connected, matmuls) run at each precision in
    the compiled graph: whether an int8 engine really computes in int8."""
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in _COMPUTE_LAYERS:
            counts[info["runtimePrecision"].astype(str)] += 1
    return dict(sorted(counts.items()))


def _compile(model: Any, config: dict[str, Any]) -> Any:
    try:
        return _core().compile_model(model, "CPU", config)
    except Exception as exc:
        raise EngineError(
            f"OpenVINO cannot compile this model for the CPU: {_openvino_sentence(exc)}",
            code="model_not_runnable",
        ) from exc


@dataclass(frozen=True)
class OpenVinoLoadOptions(LoadOptions):
    threads: int | None = None  # None: all cores
    #: OpenVINO's PERFORMANCE_HINT: LATENCY (one stream on all threads: one call at a time, each as
    #: fast as it gets) or THROUGHPUT (several streams: concurrent calls, each slower).
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"


class OpenVinoRunner(Runner):
    """A compiled OpenVINO model with a pool of infer requests.

    An InferRequest holds its call's tensors and is not thread-safe. A new one per call costs ~12 µs
    to create and ~40 µs more per call on the digits CNN (its buffers are allocated again), so the
    runner keeps the number the plugin calls optimal (1 under LATENCY, one per stream under
    THROUGHPUT): a caller waits for a free one, and `max_concurrency` is their number.
    """

    def __init__(self, engine_path: Path, options: OpenVinoLoadOptions):
        super().__init__()
        self._path, self._options = engine_path, options
        self.max_concurrency = 1  # type: ignore[misc]  # set from the compiled model at activation
        self._compiled: Any = None
        self._requests: queue.Queue[Any] = queue.Queue()
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._output_ports: list[Any] = []
        self.inference_precision: str | None = None

    def _activate(self) -> None:
        try:
            model = _core().read_model(str(self._path))
        except Exception as exc:
            raise EngineError(
                f"OpenVINO cannot read this engine: {_openvino_sentence(exc)}", code="model_not_runnable"
            ) from exc
        signature = json.loads(model.get_rt_info([RT_INFO_SECTION, "signature"]).astype(str))
        self._inputs, self._outputs = decide_batch_axes(
            [TensorSpec.from_dict(item) for item in signature["inputs"]],
            [TensorSpec.from_dict(item) for item in signature["outputs"]],
            self._options.batch_axes,
        )
        precision = model.get_rt_info([RT_INFO_SECTION, "inference_precision"]).astype(str)
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": self._options.performance_hint,
            "INFERENCE_PRECISION_HINT": precision,
        }
        if self._options.threads:
            config["INFERENCE_NUM_THREADS"] = self._options.threads
        self._compiled = _compile(model, config)
        self.inference_precision = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        ports = {name: port for port in self._compiled.outputs for name in port.get_names()}
        self._output_ports = [ports[spec.name] for spec in self._outputs]
        count = max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests = queue.Queue()
        for _ in range(count):
            self._requests.put(self._compiled.create_infer_request())
        self.max_concurrency = count  # type: ignore[misc]

    def _deactivate(self) -> None:
        self._requests = queue.Queue()
        self._compiled, self._output_ports = None, []

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # read once: a deactivation meanwhile replaces these, and the request goes back to its own queue
        requests, ports = self._requests, self._output_ports
        request = requests.get()
        try:
            # share_inputs: the request reads the caller's arrays without a copy (the call is
            # synchronous); outputs are copied, as the request's buffers serve the next call.
            results = request.infer(dict(feeds), share_inputs=True, share_outputs=False)
            return {spec.name: results[port] for spec, port in zip(self._outputs, ports, strict=True)}
        except Exception as exc:  # a shape the graph cannot take, e.g. a Reshape it cannot satisfy
            raise EngineError(
                f"OpenVINO failed on these inputs: {_openvino_sentence(exc)}", code="inference_failed"
            ) from exc
        finally:
            requests.put(request)

    def input_metadata(self) -> list[TensorSpec]:
        return list(self._inputs)

    def output_metadata(self) -> list[TensorSpec]:
        return list(self._outputs)


class OpenVinoCpuBackend(Backend):
    """OpenVINO's CPU plugin.

    `quantization_profile = "cpu"`, the QDQ model ONNX Runtime runs, for three reasons. OpenVINO
    computes either profile's model as faithfully as ONNX Runtime does (the same top-1 and errors),
    and the `cpu` one as fast or 5-15% faster (ResNet-18, MobileNetV2); the `tensorrt` placement,
    which leaves the logits in float, is closer only on the digits logits (3% against 13% max
    error, for the same top-1). The `cpu` profile drops to 7-bit weights on CPUs without VNNI, the
    workaround OpenVINO's own documentation gives for the u8×s8 saturation of its int8 kernels
    there, which the `tensorrt` profile never does. And a recipe targeting both CPU backends then
    quantizes, calibrates and reports once, without the TensorRT readiness lint that the
    `tensorrt` profile runs (and fails on for models TensorRT alone refuses).
    """

    name = "openvino-cpu"
    queue = "cpu"
    quantization_profile = "cpu"
    precisions = ("fp32", "fp16", "bf16", "int8", "int8-dynamic", "int4-weight", "int8-weight")
    native_precisions = frozenset({"bf16"})  # the fp32 model, computed in bf16 (INFERENCE_PRECISION_HINT)
    load_options = OpenVinoLoadOptions

    @classmethod
    def precision_unavailable(cls, precision: str) -> str | None:
        return bf16_unsupported(cpu_info()["cpu_features"]) if precision == "bf16" else None

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("openvino") is not None

    def compile(self, onnx_path: Path, out_dir: Path, options: CompileOptions) -> EngineArtifact:
        """Convert the ONNX to IR with our signature and inference precision in its runtime info,
        save it (weights as they are: fp16 only in the fp16 model), and compile it once on the CPU
        to prove it compiles and to record what the plugin actually runs."""
        import openvino as ov

        unavailable = self.precision_unavailable(options.precision)
        if unavailable is not None:
            raise EngineError(unavailable, code="precision_not_supported")
        out_dir.mkdir(parents=True, exist_ok=True)
        engine_path = out_dir / ENGINE_FILENAME
        capabilities = list(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        hint, note = inference_precision_for(options.precision, capabilities)
        started = time.perf_counter()
        inputs, outputs = decide_batch_axes(*onnx_signature(onnx_path), options.batch_axes)  # kept in the IR
        model = _read_onnx(onnx_path)
        _check_names(model, inputs, outputs)
        signature = {
            "inputs": [spec.to_dict() for spec in inputs],
            "outputs": [spec.to_dict() for spec in outputs],
        }
        model.set_rt_info(json.dumps(signature), [RT_INFO_SECTION, "signature"])
        model.set_rt_info(hint, [RT_INFO_SECTION, "inference_precision"])
        ov.save_model(model, str(engine_path), compress_to_fp16=False)
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = options.threads
        compiled = _compile(_core().read_model(str(engine_path)), config)
        build_seconds = time.perf_counter() - started
        return EngineArtifact(
            backend=self.name,
            precision=options.precision,
            path=engine_path,
            build_seconds=build_seconds,
            metadata={
                "openvino": ov.__version__,
                "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                "compute_layers_by_precision": _runtime_precisions(compiled),
                "cpu_capabilities": capabilities,
                "notes": [note] if note else [],
                "verified_on_hardware": True,
            },
        )

    def load(self, engine_path: Path, options: LoadOptions | None = None) -> OpenVinoRunner:
        options = self.load_options_for(options)
        return OpenVinoRunner(engine_path, options).activate()  # type: ignore[return-value]

    def hardware(self, threads: int | None = None) -> dict[str, Any]:
        import openvino as ov

        return cpu_hardware(threads, openvino=ov.__version__)
