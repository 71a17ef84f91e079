"""The registry of INT8 quantization methods: what `QuantizeConfig.calibration` names.

A method turns a prepared float model (engines.quantize.int8.prepare_float_model) into a QDQ INT8
model. Adding one is a function decorated `@register_method("name", description=…, family=…)` in
the module of its family; engines.quantize.int8 imports those modules, so the registry is complete
wherever it is read through int8 (`CALIBRATION_METHODS`, `quantize_int8`: the recipe checks, the
API's enum, GET /v1/capabilities, the search).

- `family`: methods of one family share their machinery and so fail the same way (the three ONNX
  Runtime calibrators share ORT's quantizer): a search that saw one fail on a graph can skip the
  others of its family.
- `applies(float_path)`: None, or why the method does not apply to this graph (SmoothQuant needs
  MatMuls to smooth into; equalization needs Conv → activation → Conv chains). quantize_int8 turns a
  reason into EngineError `quantization_not_applicable`.
- `profiles`: the INT8 profiles it can produce (`cpu`: ONNX Runtime and OpenVINO on the CPU,
  `tensorrt`: symmetric, zero points 0).

Every method honours `QuantizeConfig.nodes_to_exclude` (the accuracy budget's float fallback keeps
nodes in float through it), keeps `always_float_nodes` in float too (other floats than float32, and
float arithmetic that computes indices or shapes) and fills `QuantizeResult.metadata` with what ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

from engines.errors import EngineError, InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.quantize.index_paths import index_path_nodes

logger = logging.getLogger(__name__)

Profile = Literal["cpu", "tensorrt"]
PROFILES: tuple[Profile, ...] = ("cpu", "tensorrt")
#: TensorRT's guidance is ~500-1000 representative samples; far fewer gives ranges that overfit.
RECOMMENDED_CALIBRATION_SAMPLES = 500
_INT8_DOT_PRODUCT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class QuantizeConfig:
    calibration: str = "minmax"  # the quantization method (QUANTIZATION_METHODS)
    per_channel: bool = True
    calibration_samples: int | None = None  # None: the whole calibration set
    reduce_range: bool | None = None  # None: decided from the CPU's features (cpu profile)
    nodes_to_exclude: tuple[str, ...] = ()


@dataclass
class QuantizeResult:
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


class MethodQuantizer(Protocol):
    def __call__(
        self,
        float_path: Path,
        out_path: Path,
        calibration: Dataset,
        config: QuantizeConfig,
        *,
        profile: Profile,
        batch_size: int,
        cpu_features: list[str],
    ) -> QuantizeResult: ...


def _always(_float_path: Path) -> str | None:
    return None


@dataclass(frozen=True)
class QuantizationMethod:
    name: str
    description: str  # one line, for people choosing (capabilities, reports)
    family: str  # methods of one family fail the same way
    quantize: MethodQuantizer
    applies: Callable[[Path], str | None] = _always
    profiles: tuple[Profile, ...] = PROFILES
    #: Why the other profiles are out of its reach (the error a recipe asking one gets).
    profiles_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "family": self.family,
            "profiles": list(self.profiles),
        }


#: name -> method, in registration order (ONNX Runtime's calibrators first: int8 registers them).
QUANTIZATION_METHODS: dict[str, QuantizationMethod] = {}


def register_method(
    name: str,
    *,
    description: str,
    family: str,
    applies: Callable[[Path], str | None] = _always,
    profiles: tuple[Profile, ...] = PROFILES,
    profiles_reason: str = "",
) -> Callable[[MethodQuantizer], MethodQuantizer]:
    """Register the decorated function as quantization method `name`."""

    def decorate(quantize: MethodQuantizer) -> MethodQuantizer:
        if name in QUANTIZATION_METHODS:
            raise ValueError(f"quantization method '{name}' is registered twice")
        QUANTIZATION_METHODS[name] = QuantizationMethod(
            name, description, family, quantize, applies, profiles, profiles_reason
        )
        return quantize

    return decorate


def reduce_range_for(cpu_features: list[str]) -> tuple[bool, str]:
    """Whether 7-bit weights are needed on this CPU, and why (recorded in the engine)."""
    found = [name for name in _INT8_DOT_PRODUCT_FEATURES if name in cpu_features]
    if found:
        return False, f"CPU has {', '.join(found)}: u8×s8 dot products do not saturate, full 8-bit weights"
    return (
        True,
        "CPU has no VNNI/AMX: u8×s8 products saturate in 16 bits, so weights use 7 bits (reduce_range)",
    )


def not_applicable(method: str, reason: str) -> EngineError:
    """The error of a method that does not apply to a graph or a profile (the job goes on without it)."""
    return EngineError(
        f"quantization method '{method}' does not apply here: {reason}", code="quantization_not_applicable"
    )


def calibration_sample_count(
    calibration: Dataset, config: QuantizeConfig, batch_size: int
) -> tuple[int, list[str]]:
    """How many calibration samples to use (whole batches), and the warning when they are few."""
    samples = calibration.samples if config.calibration_samples is None else config.calibration_samples
    samples = min(samples, calibration.samples)
    samples -= samples % batch_size if samples >= batch_size else 0  # calibration runs whole batches
    if samples < batch_size:
        raise InvalidRecipeError(
            f"calibration needs at least one batch of {batch_size} samples (the model's batch); "
            f"{samples} are available (calibration set {calibration.samples}, "
            f"calibration_samples {config.calibration_samples})"
        )
    messages = []
    if samples < RECOMMENDED_CALIBRATION_SAMPLES:
        messages.append(
            f"calibrated on {samples} samples; about {RECOMMENDED_CALIBRATION_SAMPLES}-1000 representative "
            "samples are recommended (TensorRT's guidance): ranges from few samples can clip real inputs"
        )
    return samples, messages


def load_graph_only(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False)


def count_quantize_nodes(graph: Any) -> int:
    """QuantizeLinear nodes in a graph and its subgraphs: how much of the model is really INT8."""
    count = 0
    for node in graph.node:
        count += node.op_type == "QuantizeLinear"
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                count += count_quantize_nodes(subgraph)
    return count


#: Float element types other than float32, which QuantizeLinear does not take at opset 13.
_OTHER_FLOATS = frozenset({10, 11, 16})  # FLOAT16, DOUBLE, BFLOAT16


@dataclass(frozen=True)
class AlwaysFloat:
    """The nodes every static INT8 method keeps in float, whatever the recipe says, and why.

    - `other_floats` (name, op type): nodes that read or write a float tensor other than float32.
      Models converted to float16 in part (a U-Net whose weights sit in float16 behind Cast nodes, a
      float16 Resize feeding a float16 Concat) have such tensors between float32 ones. ONNX Runtime's
      quantizer takes float16 tensors as quantizable and puts a QuantizeLinear on them, which no
      session loads (`Type 'tensor(float16)' of input parameter … of operator (QuantizeLinear)`).
    - `index_paths`: float arithmetic that computes an index or a shape (MPNet's and T5's relative
      position buckets; engines.quantize.index_paths): quantized, its indices come out of bounds.
    """

    other_floats: tuple[tuple[str, str], ...] = ()
    index_paths: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*(name for name, _ in self.other_floats), *self.index_paths]))

    def messages(self) -> list[str]:
        """What the quantize result says about them (nothing when there are none)."""
        messages = []
        if self.other_floats:
            ops = sorted({op for _, op in self.other_floats})
            messages.append(
                f"{len(self.other_floats)} node(s) compute in float16 or another float than float32 "
                f"({', '.join(ops)}): they are kept in float, since INT8 quantization takes float32 "
                "tensors only; the float32 rest of the model is quantized"
            )
        if self.index_paths:
            messages.append(
                f"kept {len(self.index_paths)} node(s) of index/shape computations in float (float "
                "arithmetic that ends in Gather indices or shapes, e.g. relative-position buckets): "
                "quantized, its rounding would give out-of-range indices"
            )
        return messages

    def metadata(self) -> dict[str, list[str]]:
        return {
            "float16_nodes_kept_float": [name for name, _ in self.other_floats],
            "index_nodes_kept_float": list(self.index_paths),
        }


@lru_cache(maxsize=8)
def always_float_nodes(path: Path, _mtime_ns: int) -> AlwaysFloat:
    """The nodes of the prepared float model at `path` that every static method keeps in float (see
    AlwaysFloat): the one place where they are decided; each method adds the recipe's
    `nodes_to_exclude`. Types come from ONNX's shape inference (not strict: what it cannot type is
    left alone, or for index paths counted as float)."""
    import onnx

    model = load_graph_only(path)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model shape inference cannot take keeps its declared types
        logger.info("shape inference failed while typing the model's tensors", exc_info=True)
    graph = model.graph
    types = {tensor.name: tensor.data_type for tensor in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.WhichOneof("value") == "tensor_type":
            types[value.name] = value.type.tensor_type.elem_type
    other_floats = tuple(
        (node.name, node.op_type)
        for node in graph.node
        if any(types.get(name) in _OTHER_FLOATS for name in [*node.input, *node.output] if name)
    )
    return AlwaysFloat(other_floats, index_path_nodes(graph, types))
