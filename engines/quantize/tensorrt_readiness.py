"""Will TensorRT build this QDQ ONNX model in INT8, and build it fast? A lint that needs no GPU.

TensorRT 10/11 builds INT8 only by explicit quantization: it reads the model's QuantizeLinear /
DequantizeLinear nodes and honours them. A QDQ model that ONNX Runtime runs well can still fail
TensorRT's build (uint8 or asymmetric zero points, per-channel weights on an axis TensorRT does not
take, an int32 bias DequantizeLinear, an operator its ONNX parser lacks) or build slower than it
should (Q/DQ where no INT8 kernel follows). TensorRT cannot be installed on CPU nodes, so these
checks read the graph instead, and say for each finding what to change.

- `problems`: the build fails or does not build what the model says. `ready` is False.
- `warnings`: the engine builds, but pays for it in speed (placement in the spirit of NVIDIA's Model
  Optimizer, whose ONNX INT8 path places Q/DQ for TensorRT).

The operators ONNX-TensorRT supports are data, in data/onnx_tensorrt_operators.json, with the
source (onnx-tensorrt's docs/operators.md), the TensorRT version it describes and when it was read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

#: Per-channel Q/DQ axes and TensorRT's explicit quantization need opset 13.
MIN_OPSET = 13
_DEFAULT_DOMAINS = ("", "ai.onnx")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
#: Ops whose weight input is input 1 and whose bias (if any) is input 2.
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_BIAS_OPS = ("Conv", "ConvTranspose", "Gemm")
#: Ops Model Optimizer's ONNX INT8 path quantizes (the `quantize` docstring in
#: modelopt/onnx/quantization/int8.py, plus what its configure_ort registers): an activation Q/DQ
#: pays only when one of them reads it.
QUANTIZABLE_OPS = frozenset(
    {
        "Add",
        "AveragePool",
        "BatchNormalization",
        "Clip",
        "Conv",
        "ConvTranspose",
        "Gemm",
        "GlobalAveragePool",
        "HardSwish",
        "LayerNormalization",
        "LRN",
        "MatMul",
        "MaxPool",
        "Mul",
    }
)
#: Data-movement ops TensorRT moves Q/DQ across: look through them for the op that reads the tensor.
_PASS_THROUGH_OPS = frozenset(
    {"Concat", "Flatten", "Identity", "Pad", "Reshape", "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze"}
)
#: Below this many input or output channels a Conv rarely gains from INT8 on TensorRT (Model
#: Optimizer's find_nodes_from_convs_to_exclude, with its exceptions; see _small_conv).
SMALL_CONV_CHANNELS = 16

# onnx.TensorProto data types, by number, so that the module imports without onnx.
_UINT8, _INT8 = 2, 3
_TYPE_NAMES = {
    1: "FLOAT",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    10: "FLOAT16",
    16: "BFLOAT16",
    17: "FLOAT8E4M3FN",
    18: "FLOAT8E4M3FNUZ",
    19: "FLOAT8E5M2",
    20: "FLOAT8E5M2FNUZ",
    21: "UINT4",
    22: "INT4",
    23: "FLOAT4E2M1",
}
#: Quantized types TensorRT builds besides INT8 (on GPUs that have them); this lint checks INT8.
_OTHER_TRT_QUANTIZED_TYPES = {17, 22, 23}
_DATA_FILE = "data/onnx_tensorrt_operators.json"


@dataclass(frozen=True)
class Problem:
    """One finding: `code` for machines, `nodes` it concerns, `message` saying what to do."""

    code: str
    nodes: tuple[str, ...]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "nodes": list(self.nodes), "message": self.message}


@dataclass(frozen=True)
class ReadinessReport:
    """`ready` is False exactly when there are `problems`; `warnings` build, but cost speed."""

    ready: bool
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    operator_list: str = ""  # which ONNX-TensorRT operator list the check used

    @property
    def codes(self) -> set[str]:
        """Every problem and warning code, for quick membership checks."""
        return {finding.code for finding in [*self.problems, *self.warnings]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "problems": [problem.to_dict() for problem in self.problems],
            "warnings": [warning.to_dict() for warning in self.warnings],
            "operator_list": self.operator_list,
        }


@dataclass(frozen=True)
class OperatorSupport:
    """ONNX-TensorRT's operator support matrix: op type → entry, and where the list came from."""

    source: dict[str, Any]
    operators: dict[str, dict[str, Any]]

    @property
    def opset_range(self) -> tuple[int, int]:
        low, high = self.source.get("opset_range", (1, 10**6))
        return int(low), int(high)

    def describe(self) -> str:
        return (
            f"ONNX-TensorRT operators for TensorRT {self.source.get('tensorrt_version', '?')} "
            f"({self.source.get('url', '?')}, read {self.source.get('read_on', '?')})"
        )


@cache
def operator_support() -> OperatorSupport:
    """The operator list, read from the package's JSON on first use and kept (it never changes
    while the process runs; reading it at import would cost every worker that never lints)."""
    text = resources.files("engines.quantize").joinpath(_DATA_FILE).read_text(encoding="utf-8")
    data = json.loads(text)
    return OperatorSupport(source=data["source"], operators=data["operators"])


def check_tensorrt_readiness(model: onnx.ModelProto | Path | str) -> ReadinessReport:
    """Lint a QDQ ONNX model for TensorRT's INT8 (explicit quantization) build.

    `model` is a ModelProto or a path; from a path, external weights are not read (the checks need
    only shapes, scales and zero points, which are read on demand).
    """
    import onnx

    base_dir = ""
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        base_dir = str(path.parent)
        model = onnx.load(str(path), load_external_data=False)
    support = operator_support()
    lint = _Lint(model, base_dir, support)
    lint.run()
    return ReadinessReport(
        ready=not lint.problems,
        problems=lint.problems,
        warnings=lint.warnings,
        operator_list=support.describe(),
    )


def _type_name(elem_type: int | None) -> str:
    return _TYPE_NAMES.get(elem_type or 0, f"type {elem_type}")


def _attribute(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _subgraphs(node: Any) -> Iterator[Any]:
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def _all_graph_nodes(graph: Any) -> Iterator[Any]:
    """Nodes of a graph and of its If/Loop/Scan bodies (TensorRT parses those too)."""
    for node in graph.node:
        yield node
        for subgraph in _subgraphs(node):
            yield from _all_graph_nodes(subgraph)


def _label(node: Any) -> str:
    return node.name or f"{node.op_type}({', '.join(node.output)})"


class _Lint:
    """The checks over one model; findings accumulate in `problems` and `warnings`."""

    def __init__(self, model: Any, base_dir: str, support: OperatorSupport) -> None:
        self.model = model
        self.graph = model.graph
        self.base_dir = base_dir
        self.support = support
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.functions = {(function.domain, function.name): function for function in model.functions}
        self.nodes = list(_all_graph_nodes(self.graph))
        for function in model.functions:
            self.nodes.extend(function.node)
        self.initializers: dict[str, Any] = {}
        self.constant_nodes: dict[str, Any] = {}
        self.elem_types: dict[str, int] = {}
        self._collect_tensors(self.graph)
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_inputs = {value.name for value in self.graph.input} - set(self.initializers)
        self.graph_outputs = {value.name for value in self.graph.output}
        self._arrays: dict[str, np.ndarray | None] = {}

    def _collect_tensors(self, graph: Any) -> None:
        for tensor in graph.initializer:
            self.initializers[tensor.name] = tensor
            self.elem_types[tensor.name] = tensor.data_type
        for value in [*graph.input, *graph.value_info, *graph.output]:
            if value.type.WhichOneof("value") == "tensor_type" and value.type.tensor_type.elem_type:
                self.elem_types.setdefault(value.name, value.type.tensor_type.elem_type)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
                self.constant_nodes[node.output[0]] = node
                value = _attribute(node, "value")
                if value is not None:
                    self.elem_types[node.output[0]] = value.data_type
            for subgraph in _subgraphs(node):
                self._collect_tensors(subgraph)

    # --- tensors -----------------------------------------------------------------------------

    def _resolve(self, name: str) -> str:
        """Look through Identity nodes (exporters leave them between a constant and its reader)."""
        seen = set()
        while name not in seen:
            seen.add(name)
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity" or not node.input:
                return name
            name = node.input[0]
        return name

    def is_constant(self, name: str) -> bool:
        name = self._resolve(name)
        return name in self.initializers or name in self.constant_nodes

    def array(self, name: str) -> np.ndarray | None:
        """A constant's value (initializer or Constant node), read once; None when not constant."""
        name = self._resolve(name)
        if name not in self._arrays:
            self._arrays[name] = self._read_array(name)
        return self._arrays[name]

    def _read_array(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name], base_dir=self.base_dir)
        node = self.constant_nodes.get(name)
        if node is None:
            return None
        for attribute in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            value = _attribute(node, attribute)
            if value is None:
                continue
            if attribute == "value":
                return numpy_helper.to_array(value)
            return np.asarray(value, dtype=np.float32 if "float" in attribute else np.int64)
        return None

    def shape(self, name: str) -> tuple[int, ...] | None:
        name = self._resolve(name)
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        array = self.array(name)
        return None if array is None else array.shape

    def elem_type(self, name: str, depth: int = 0) -> int | None:
        name = self._resolve(name)
        if name in self.elem_types:
            return self.elem_types[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "QuantizeLinear" and depth < 8:
            return self.quantized_type(node, depth + 1)
        return None

    def quantized_type(self, node: Any, depth: int = 0) -> int | None:
        """The integer type a Q/DQ node quantizes to: its zero point's type; without a zero point a
        QuantizeLinear makes UINT8 (unless opset 21's output_dtype says otherwise), and a
        DequantizeLinear reads its input's type."""
        if len(node.input) > 2 and node.input[2]:
            return self.elem_type(node.input[2], depth)
        if node.op_type == "QuantizeLinear":
            return int(_attribute(node, "output_dtype", 0)) or _UINT8
        return self.elem_type(node.input[0], depth)

    def weight_source(self, dequantize: Any) -> str | None:
        """The float or quantized constant a DequantizeLinear dequantizes, when it is a weight:
        DQ(int8 initializer), or DQ(Q(float initializer)) as AddQDQPairToWeight writes it."""
        source = dequantize.input[0]
        if self.is_constant(source):
            return source
        producer = self.producer.get(self._resolve(source))
        if (
            producer is not None
            and producer.op_type == "QuantizeLinear"
            and self.is_constant(producer.input[0])
        ):
            return producer.input[0]
        return None

    def producer_of(self, name: str, op_type: str) -> Any:
        node = self.producer.get(self._resolve(name))
        return node if node is not None and node.op_type == op_type else None

    # --- findings ------------------------------------------------------------------------------

    def problem(self, code: str, nodes: list[str] | tuple[str, ...], message: str) -> None:
        self.problems.append(Problem(code, tuple(nodes), message))

    def warning(self, code: str, nodes: list[str] | tuple[str, ...], message: str) -> None:
        self.warnings.append(Problem(code, tuple(nodes), message))

    def run(self) -> None:
        self.check_opset()
        bias_dequantizers = self.check_weighted_ops()
        self.check_qdq_nodes(skip=bias_dequantizers)
        self.check_operators()
        self.check_outputs()
        self.check_activation_placement()
        self.check_concats()

    def check_opset(self) -> None:
        opset = next(
            (entry.version for entry in self.model.opset_import if entry.domain in _DEFAULT_DOMAINS), 0
        )
        if opset < MIN_OPSET:
            self.problem(
                "opset_too_old",
                [],
                f"the model is opset {opset}: per-channel Q/DQ (the `axis` attribute) and TensorRT's "
                f"explicit quantization need opset ≥ {MIN_OPSET}; convert the float model "
                f"(onnx.version_converter.convert_version(model, {MIN_OPSET})) and quantize again",
            )
        low, high = self.support.opset_range
        if opset > high:
            self.warning(
                "opset_newer_than_parser",
                [],
                f"the model is opset {opset}; the ONNX-TensorRT list used here covers opsets {low}-{high} "
                f"(TensorRT {self.support.source.get('tensorrt_version', '?')}): export at opset ≤ {high} "
                "or use a TensorRT whose parser knows this opset",
            )

    def check_qdq_nodes(self, skip: set[int]) -> None:
        """Each Q/DQ: ONNX domain, INT8, zero point 0, constant positive finite scales, and
        per-tensor on activations (TensorRT quantizes activations per tensor only)."""
        for node in self.nodes:
            if node.op_type not in _QDQ_OPS or id(node) in skip:
                continue
            name = _label(node)
            if node.domain not in _DEFAULT_DOMAINS:
                self.problem(
                    "qdq_not_onnx_domain",
                    [name],
                    f"{node.op_type} '{name}' is in the {node.domain} domain (ONNX Runtime's contrib op, "
                    "written with UseQDQContribOps or 16-bit types): TensorRT parses only the ONNX "
                    "QuantizeLinear/DequantizeLinear; quantize to INT8 without UseQDQContribOps",
                )
            self._check_type_and_zero_point(node, name)
            self._check_scale(node, name)

    def _check_type_and_zero_point(self, node: Any, name: str) -> None:
        quantized = self.quantized_type(node)
        no_zero_point = node.op_type == "QuantizeLinear" and (len(node.input) < 3 or not node.input[2])
        if quantized is not None and quantized != _INT8:
            if quantized in _OTHER_TRT_QUANTIZED_TYPES:
                self.warning(
                    "quantized_type_not_int8",
                    [name],
                    f"{node.op_type} '{name}' quantizes to {_type_name(quantized)}: TensorRT builds it "
                    "only on GPUs with that type, and this lint checks INT8; quantize to INT8 for any GPU",
                )
            else:
                self.problem(
                    "zero_point_not_int8",
                    [name],
                    f"{node.op_type} '{name}' quantizes to {_type_name(quantized)}"
                    + (" (no zero point: QuantizeLinear then defaults to UINT8)" if no_zero_point else "")
                    + ": TensorRT's Q/DQ are signed INT8 only (UINT8 only as a network input/output); "
                    "quantize with activation_type=weight_type=QuantType.QInt8 and an INT8 zero point "
                    "(our `tensorrt` profile)",
                )
        if len(node.input) < 3 or not node.input[2]:
            return
        zero_point = node.input[2]
        if not self.is_constant(zero_point):
            self.problem(
                "zero_point_not_constant",
                [name],
                f"{node.op_type} '{name}' takes its zero point from '{zero_point}', computed at run time: "
                "TensorRT needs it a build-time constant 0; quantize statically (quantize_static, not "
                "dynamic quantization) so that zero points are initializers",
            )
            return
        values = self.array(zero_point)
        if values is not None and np.any(values != 0):
            self.problem(
                "zero_point_not_zero",
                [name],
                f"{node.op_type} '{name}' has a non-zero zero point ({np.unique(values)[:4].tolist()}): "
                "TensorRT quantizes symmetrically only (zero point 0); quantize with "
                "ActivationSymmetric=True and WeightSymmetric=True (our `tensorrt` profile)",
            )

    def _check_scale(self, node: Any, name: str) -> None:
        scale = node.input[1] if len(node.input) > 1 else ""
        if not scale or not self.is_constant(scale):
            self.problem(
                "scale_not_constant",
                [name],
                f"{node.op_type} '{name}' takes its scale from '{scale}', computed at run time: TensorRT "
                "needs Q/DQ scales as build-time constants (initializers or Constant nodes); fold the "
                "computation (onnx constant folding) or quantize statically with calibrated scales",
            )
            return
        values = self.array(scale)
        if values is None:
            return
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            self.problem(
                "scale_not_positive_finite",
                [name],
                f"{node.op_type} '{name}' has a scale that is zero, negative, NaN or infinite: TensorRT "
                "requires positive finite scales; calibrate again (a constant-zero tensor calibrates to "
                "scale 0: keep that node in float with nodes_to_exclude)",
            )
            return
        if values.size > 1 and self.weight_source(node) is None and not self.is_constant(node.input[0]):
            self.problem(
                "activation_per_channel",
                [name],
                f"{node.op_type} '{name}' quantizes an activation per channel ({values.size} scales): "
                "TensorRT quantizes activations per tensor only; use one scale (per_channel applies to "
                "weights only in ONNX Runtime's quantizer)",
            )

    def check_weighted_ops(self) -> set[int]:
        """Per-channel weights on the output-channel axis; biases left in float. Returns the ids of
        bias DequantizeLinear nodes, whose own type check would only repeat the finding."""
        bias_dequantizers: set[int] = set()
        for node in self.nodes:
            if (
                node.op_type not in _WEIGHTED_OPS
                or node.domain not in _DEFAULT_DOMAINS
                or len(node.input) < 2
            ):
                continue
            self._check_weight_axis(node)
            if node.op_type in _BIAS_OPS and len(node.input) > 2 and node.input[2]:
                dequantize = self.producer_of(node.input[2], "DequantizeLinear")
                if dequantize is not None:
                    bias_dequantizers.add(id(dequantize))
                    kind = _type_name(self.quantized_type(dequantize))
                    self.problem(
                        "bias_quantized",
                        [_label(node), _label(dequantize)],
                        f"{node.op_type} '{_label(node)}' reads a quantized bias ({kind} through "
                        f"DequantizeLinear '{_label(dequantize)}'): TensorRT's DequantizeLinear takes "
                        "INT8/FP8/INT4 only and fuses the bias in float; quantize with QuantizeBias=False "
                        "(our `tensorrt` profile) so the bias stays a float initializer",
                    )
        return bias_dequantizers

    def _expected_axis(self, node: Any, rank: int) -> tuple[int, str]:
        if node.op_type == "Conv":
            return 0, "Conv weights [C_out, C_in/group, k…]: axis 0"
        if node.op_type == "ConvTranspose":
            return 1, "ConvTranspose weights [C_in, C_out/group, k…]: axis 1"
        if node.op_type == "Gemm":
            if _attribute(node, "transB", 0):
                return 0, "Gemm with transB=1 weights [N, K]: axis 0"
            return 1, "Gemm with transB=0 weights [K, N]: axis 1"
        return rank - 1, f"MatMul weights [..., K, N]: axis {rank - 1} (the last)"

    def _check_weight_axis(self, node: Any) -> None:
        dequantize = self.producer_of(node.input[1], "DequantizeLinear")
        if dequantize is None:
            return
        weight = self.weight_source(dequantize)
        scale_shape = self.shape(dequantize.input[1]) if len(dequantize.input) > 1 else None
        if weight is None or scale_shape is None or int(np.prod(scale_shape)) <= 1:
            return  # not a constant weight, or per-tensor: any axis is fine
        shape = self.shape(weight)
        if not shape:
            return
        rank = len(shape)
        axis = int(_attribute(dequantize, "axis", 1))
        axis = axis + rank if axis < 0 else axis
        expected, why = self._expected_axis(node, rank)
        if axis != expected:
            self.problem(
                "weight_axis_not_output_channels",
                [_label(node), _label(dequantize)],
                f"the weight of {node.op_type} '{_label(node)}' is quantized per channel on axis {axis}; "
                f"TensorRT quantizes weights per output channel ({why}): a scale per other index (the "
                "reduction axis) cannot be applied after an integer GEMM/convolution; quantize again on "
                f"that axis (ONNX Runtime: extra_options QDQOpTypePerChannelSupportToAxis="
                f"{{'{node.op_type}': {expected if node.op_type != 'MatMul' else -1}}}) or per tensor",
            )

    def check_operators(self) -> None:
        """Every node's op on ONNX-TensorRT's list; one finding per op type, naming its nodes."""
        unsupported: dict[tuple[str, str], list[str]] = {}
        for node in self.nodes:
            domain = node.domain if node.domain not in _DEFAULT_DOMAINS else ""
            if (node.domain, node.op_type) in self.functions:
                continue  # a model-local function: the parser inlines it, its body is checked
            if domain and node.op_type in _QDQ_OPS:
                continue  # reported as qdq_not_onnx_domain
            entry = self.support.operators.get(node.op_type) if not domain else None
            if entry is None or not entry.get("supported"):
                unsupported.setdefault((domain, node.op_type), []).append(_label(node))
        version = self.support.source.get("tensorrt_version", "?")
        for (domain, op_type), names in unsupported.items():
            if domain:
                self.problem(
                    "operator_not_onnx_domain",
                    names,
                    f"{len(names)} {domain}::{op_type} node(s): TensorRT's ONNX parser implements the ONNX "
                    f"domain only and would look for a TensorRT plugin named '{op_type}'; export without "
                    "ONNX Runtime's fusions (graph optimization level basic or off) or register a plugin",
                )
                continue
            entry = self.support.operators.get(op_type)
            note = f" ({entry['restrictions']})" if entry and entry.get("restrictions") else ""
            self.problem(
                "operator_not_supported" if entry is not None else "operator_not_listed",
                names,
                f"{len(names)} {op_type} node(s): "
                + (
                    f"ONNX-TensorRT (TensorRT {version}) marks {op_type} unsupported{note}"
                    if entry is not None
                    else f"{op_type} is not on ONNX-TensorRT's operator list (TensorRT {version})"
                )
                + "; replace it with supported ops before export, keep that part outside the engine, or "
                "provide a TensorRT plugin"
                + (
                    " (QOperator format: quantize with QuantFormat.QDQ instead)"
                    if op_type.startswith("QLinear")
                    else ""
                ),
            )

    # --- placement warnings (main graph) ----------------------------------------------------------

    def check_outputs(self) -> None:
        names = [
            _label(node)
            for output in self.graph_outputs
            if (node := self.producer.get(output)) is not None and node.op_type in _QDQ_OPS
        ]
        if names:
            self.warning(
                "qdq_on_graph_output",
                sorted(names),
                "Q/DQ on the model's outputs: TensorRT then computes the last layer in INT8 and "
                "requantizes its result, which costs time and output precision for no INT8 kernel after "
                "it; leave outputs in float (ONNX Runtime: extra_options OpTypesToExcludeOutputQuantization "
                "with the last layer's op type, as Model Optimizer does for every op)",
            )

    def _reaches_quantizable(self, tensor: str, seen: set[str]) -> bool:
        """Does an op TensorRT runs in INT8 read this tensor, looking through data movement and
        requantization (TensorRT moves Q/DQ across those)?"""
        if tensor in seen:
            return False
        seen.add(tensor)
        for consumer in self.consumers.get(tensor, []):
            if consumer.op_type in QUANTIZABLE_OPS:
                return True
            moves_qdq = consumer.op_type in _PASS_THROUGH_OPS or consumer.op_type in _QDQ_OPS
            if moves_qdq and any(self._reaches_quantizable(output, seen) for output in consumer.output):
                return True
        return False

    def check_activation_placement(self) -> None:
        """Activation Q/DQ pairs with no INT8 op after them, and small quantized convolutions."""
        idle: list[str] = []
        for node in self.graph.node:
            if node.op_type != "DequantizeLinear" or not node.output:
                continue
            quantize = self.producer_of(node.input[0], "QuantizeLinear")
            if quantize is None or self.weight_source(node) is not None:
                continue  # weights, or a DQ of a pre-quantized input
            if node.output[0] in self.graph_outputs:
                continue  # qdq_on_graph_output
            if not self._reaches_quantizable(node.output[0], set()):
                idle.append(_label(node))
        if idle:
            self.warning(
                "qdq_not_feeding_quantizable_op",
                idle,
                f"{len(idle)} Q/DQ pair(s) feed no op TensorRT runs in INT8 (Conv, ConvTranspose, Gemm, "
                "MatMul, pooling, Add, Mul…), e.g. the outputs of weighted ops before an activation: each "
                "costs an explicit quantize/dequantize (and blocks fusions) for no INT8 kernel; quantize the "
                "inputs of quantizable ops only (ONNX Runtime: OpTypesToExcludeOutputQuantization, "
                "op_types_to_quantize)",
            )
        small = [
            _label(node) for node in self.graph.node if node.op_type == "Conv" and self._small_conv(node)
        ]
        if small:
            self.warning(
                "small_conv_quantized",
                small,
                f"{len(small)} quantized Conv(s) with fewer than {SMALL_CONV_CHANNELS} input or output "
                "channels, outside the shapes TensorRT has fast INT8 kernels for: INT8 rarely pays "
                "there, and the Q/DQ around them costs; keep them in float (nodes_to_exclude), as Model "
                "Optimizer does",
            )

    def _small_conv(self, node: Any) -> bool:
        """Model Optimizer's INT8 rule (find_nodes_from_convs_to_exclude): a quantized Conv with
        C_in or C_out < 16 is worth keeping in float, unless (group 1) a channel count is a multiple
        of 8, it reads the model's input or has 16+ channels on one side, and its kernel is square;
        or (grouped) C_out is a multiple of 8 and every kernel dim is ≥ 3."""
        dequantize = self.producer_of(node.input[1], "DequantizeLinear") if len(node.input) > 1 else None
        weight = self.weight_source(dequantize) if dequantize is not None else None
        shape = self.shape(weight) if weight is not None else None
        if not shape or len(shape) < 3:
            return False
        c_out, c_in = shape[0], shape[1]
        if c_out >= SMALL_CONV_CHANNELS and c_in >= SMALL_CONV_CHANNELS:
            return False
        group = int(_attribute(node, "group", 1))
        kernel = list(_attribute(node, "kernel_shape", shape[2:]))
        if group == 1:
            reads_input = self._float_source(node.input[0]) in self.graph_inputs
            return not (
                (c_out % 8 == 0 or c_in % 8 == 0)
                and (reads_input or c_out >= SMALL_CONV_CHANNELS or c_in >= SMALL_CONV_CHANNELS)
                and len(set(kernel)) == 1
            )
        return not (c_out % 8 == 0 and all(k >= 3 for k in kernel))

    def _float_source(self, name: str) -> str:
        """The float tensor behind a DQ(Q(x)) pair: x."""
        dequantize = self.producer_of(name, "DequantizeLinear")
        quantize = self.producer_of(dequantize.input[0], "QuantizeLinear") if dequantize is not None else None
        return quantize.input[0] if quantize is not None else name

    def check_concats(self) -> None:
        """Concat inputs quantized with different scales, or unlike the Q after it: TensorRT moves a
        Concat's Q/DQ across it and concatenates in INT8 only when they share one scale; otherwise it
        requantizes each input (Model Optimizer's get_concat_eliminated_tensors). Float inputs are
        fine: the Q after the Concat moves onto them."""
        for node in self.graph.node:
            if node.op_type != "Concat":
                continue
            scales: list[np.ndarray] = []
            for name in node.input:
                dequantize = self.producer_of(name, "DequantizeLinear")
                scale = self.array(dequantize.input[1]) if dequantize is not None else None
                if scale is not None:
                    scales.append(np.asarray(scale, dtype=np.float64).ravel())
            for consumer in self.consumers.get(node.output[0], []):
                if consumer.op_type == "QuantizeLinear":
                    scale = self.array(consumer.input[1])
                    if scale is not None:
                        scales.append(np.asarray(scale, dtype=np.float64).ravel())
            if not scales:
                continue
            distinct: list[np.ndarray] = []
            for scale in scales:
                if not any(
                    s.shape == scale.shape and np.allclose(s, scale, rtol=1e-6, atol=0) for s in distinct
                ):
                    distinct.append(scale)
            if len(distinct) > 1:
                shown = ", ".join(f"{float(s[0]):.4g}" for s in distinct[:4])
                self.warning(
                    "concat_scales_differ",
                    [_label(node)],
                    f"Concat '{_label(node)}': its inputs and the Q after it use {len(distinct)} different "
                    f"scales ({shown}{', …' if len(distinct) > 4 else ''}): TensorRT must requantize each "
                    "input to concatenate in INT8; give the Concat's inputs and output one shared scale "
                    "(Model Optimizer's concat_elimination pass), or leave the Concat's inputs in float",
                )
