"""Which layer lost my accuracy? Per-tensor quantization error of an INT8 model vs its float model.

For every quantized activation, two signal-to-quantization-noise ratios (dB, higher is better):
`local_sqnr_db` compares the tensor right before and after its own Q/DQ pair (the error this
quantizer adds), `model_sqnr_db` compares the INT8 model's tensor with the float model's (the
error accumulated up to that point). `own_sqnr_db` is the local one, and for a Q/DQ that folds a
Relu or Clip (no local figure) the same comparison with the activation applied first: what the API's
per-layer view sorts by (app.services.layer_report). Weights get their SQNR too. Rows come worst
first by the accumulated error.

This is a diagnostic: it never fails the job it diagnoses. A part it cannot compute (a debug
model ONNX Runtime refuses, a runtime error) is listed under `unavailable` with the reason, and
the other parts are still reported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import scrub_paths
from engines.ingest.datasets import Dataset
from engines.quantize.int8 import calibration_reader

logger = logging.getLogger(__name__)

#: A handful of samples is enough to rank layers; the report runs both models with every tensor as output.
DEFAULT_SAMPLES = 16
#: Activations whose clipping the Q/DQ range does itself: their "local error" is the activation, not noise.
_FOLDED_ACTIVATIONS = {"Relu", "Clip"}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def sqnr_db(reference: Sequence[np.ndarray] | np.ndarray, noisy: Sequence[np.ndarray] | np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB; scalars (0-d weights, 0-d activations) included."""
    left = np.concatenate([np.ravel(part) for part in _as_list(reference)]).astype(np.float64)
    right = np.concatenate([np.ravel(part) for part in _as_list(noisy)]).astype(np.float64)
    epsilon = np.finfo(np.float64).eps
    with np.errstate(all="ignore"):  # NaN in, NaN out: reported as null
        return 20 * math.log10(
            max(np.linalg.norm(left), epsilon) / max(np.linalg.norm(left - right), epsilon)
        )


def _as_list(value: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    return [np.asarray(value)] if isinstance(value, np.ndarray | np.generic) else list(value)


def _reason(exc: BaseException) -> str:
    """A sentence for the report: the error without this server's paths."""
    text = scrub_paths(f"{type(exc).__name__}: {exc}")
    return text.splitlines()[0][:400]


def _activation_rows(
    float_path: Path, qdq_path: Path, data: Dataset, batch_size: int, workdir: Path
) -> list[dict[str, Any]]:
    from onnx import load
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    augmented_float, augmented_qdq = workdir / "debug-float.onnx", workdir / "debug-qdq.onnx"
    modify_model_output_intermediate_tensors(str(float_path), str(augmented_float))
    modify_model_output_intermediate_tensors(str(qdq_path), str(augmented_qdq))
    providers = ["CPUExecutionProvider"]
    float_acts = collect_activations(
        str(augmented_float), calibration_reader(data, batch_size), execution_providers=providers
    )
    qdq_acts = collect_activations(
        str(augmented_qdq), calibration_reader(data, batch_size), execution_providers=providers
    )
    # A method that rewrites the graph (cross-layer equalization, NNCF) may leave quantized tensors with
    # no float counterpart: they cannot be compared, and must not take the rest of the report down.
    matching = {
        tensor: pair
        for tensor, pair in create_activation_matching(qdq_acts, float_acts).items()
        if "float" in pair
    }
    errors = compute_activation_error(matching, err_func=sqnr_db)
    nodes = load(str(float_path), load_external_data=False).graph.node
    producers = {output: (node.name, node.op_type) for node in nodes for output in node.output}
    # A folded Relu/Clip has no Q/DQ of its own: its quantization error belongs to the op before it.
    folded_into = {
        node.name: producers.get(node.input[0], ("", ""))[0]
        for node in nodes
        if node.op_type in _FOLDED_ACTIVATIONS
    }
    rows = []
    for tensor, error in errors.items():
        node, op_type = producers.get(tensor, ("", "graph input"))
        folded = op_type in _FOLDED_ACTIVATIONS
        local = None if folded else _finite(error.get("qdq_err"))
        rows.append(
            {
                "tensor": tensor,
                "node": node,
                "op_type": op_type,
                # after a folded Relu the "pre-Q/DQ" tensor is the pre-activation: no local error to report
                "local_sqnr_db": local,
                "model_sqnr_db": _finite(error.get("xmodel_err")),
                "quantized_node": folded_into.get(node, node) if folded else node,
                # the error this quantizer adds alone, its input in float: for a folded Relu/Clip, the
                # activation applied to the pre-activation first (what the Q/DQ range clips away is
                # the activation's work, not noise)
                "own_sqnr_db": _folded_own_sqnr(matching[tensor]) if folded else local,
            }
        )
    rows.sort(key=lambda row: (row["model_sqnr_db"] is None, row["model_sqnr_db"] or 0.0))
    return rows


def _folded_own_sqnr(pair: dict[str, Any]) -> float | None:
    """The own error of a Q/DQ that folds a Relu or Clip: the pre-activation clipped to the range
    the Q/DQ output spans (Relu: at 0; Clip: its bounds, which the range reproduces) against it."""
    pre, post = pair.get("pre_qdq"), pair.get("post_qdq")
    if not pre or not post:
        return None
    try:
        low = min(float(np.min(part)) for part in post)
        high = max(float(np.max(part)) for part in post)
        clipped = [np.clip(np.asarray(part, dtype=np.float64), low, high) for part in pre]
        return _finite(sqnr_db(clipped, post))
    except ValueError:  # shapes that do not line up: not reported
        return None


def _dequantized_weights(float_path: Path, qdq_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each quantized initializer: (float weight, its dequantized INT8 copy).

    Written here rather than taken from ONNX Runtime's `create_weight_matching`, which subtracts the
    zero point in the stored integer type: uint8 constants (embedding tables, constant operands of
    Add and Mul) wrap around there and report absurd errors.
    """
    from onnx import load, numpy_helper

    floats = {
        tensor.name: tensor for tensor in load(str(float_path), load_external_data=True).graph.initializer
    }
    graph = load(str(qdq_path)).graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in constants:
            continue
        name = node.input[0].removesuffix("_quantized")
        if name not in floats or node.input[1] not in constants:
            continue
        inputs = [numpy_helper.to_array(constants[item]) for item in node.input[1:] if item in constants]
        weight = numpy_helper.to_array(floats[name])
        dequantized = _dequantize(numpy_helper.to_array(constants[node.input[0]]), inputs, node.attribute)
        if dequantized is not None and weight.shape == dequantized.shape:  # else a renamed or reshaped copy
            pairs[name] = (weight, dequantized)
    return pairs


def _dequantize(
    quantized: np.ndarray, scale_and_zero: list[np.ndarray], attributes: Any
) -> np.ndarray | None:
    """DequantizeLinear in float64: per tensor, per channel (`axis`) or per block (`block_size`);
    None for a layout it does not know."""
    attrs = {attr.name: attr.i for attr in attributes}
    values = quantized.astype(np.float64)
    scale = scale_and_zero[0].astype(np.float64)
    zero = scale_and_zero[1].astype(np.float64) if len(scale_and_zero) > 1 else np.zeros_like(scale)
    if scale.size > 1 and values.ndim:
        axis = attrs.get("axis", 1) % values.ndim
        if attrs.get("block_size"):  # opset 21: scales of the weight's rank, one per block along `axis`
            scale = np.repeat(scale, attrs["block_size"], axis=axis).take(
                range(values.shape[axis]), axis=axis
            )
            zero = np.repeat(zero, attrs["block_size"], axis=axis).take(range(values.shape[axis]), axis=axis)
        elif scale.ndim == 1:
            shape = [1] * values.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
    try:
        return np.asarray((values - zero) * scale)
    except ValueError:
        return None


def _weight_rows(float_path: Path, qdq_path: Path) -> list[dict[str, Any]]:
    from onnx import load

    consumers: dict[str, list[str]] = {}
    for node in load(str(float_path), load_external_data=False).graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    rows = [
        {"weight": name, "sqnr_db": _finite(sqnr_db(weight, dequantized)), "nodes": consumers.get(name, [])}
        for name, (weight, dequantized) in _dequantized_weights(float_path, qdq_path).items()
    ]
    rows.sort(key=lambda row: (row["sqnr_db"] is None, row["sqnr_db"] or 0.0))
    return rows


def layer_errors(
    float_path: Path, qdq_path: Path, samples: Dataset, *, batch_size: int, workdir: Path
) -> dict[str, Any]:
    """Per-tensor error of `qdq_path` against `float_path` on the first few samples.

    Never raises: a part that cannot be computed is listed in `unavailable` with the reason.
    """
    data = samples.take(max(batch_size, min(DEFAULT_SAMPLES, samples.samples)))
    report: dict[str, Any] = {"samples": data.samples, "activations": [], "weights": [], "unavailable": []}
    parts: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "activations": lambda: _activation_rows(float_path, qdq_path, data, batch_size, workdir),
        "weights": lambda: _weight_rows(float_path, qdq_path),
    }
    for part, compute in parts.items():
        try:
            report[part] = compute()
        except Exception as exc:  # a diagnostic never fails the job it diagnoses
            logger.warning("per-layer report: %s could not be analysed", part, exc_info=True)
            report["unavailable"].append({"part": part, "reason": _reason(exc)})
    return report


def most_harmful_nodes(report: dict[str, Any]) -> list[str]:
    """Quantized nodes, most harmful first: by the error their own Q/DQ adds (local SQNR), or, for an
    op whose output goes through a folded Relu, by the model SQNR right after it. Without activation
    rows (their part was unavailable), by the SQNR of each node's quantized weights."""
    scored = []
    for row in report["activations"]:
        score = row["local_sqnr_db"] if row["local_sqnr_db"] is not None else row["model_sqnr_db"]
        if row["quantized_node"] and score is not None:
            scored.append((score, row["quantized_node"]))
    if not scored:
        scored = [
            (row["sqnr_db"], node)
            for row in report["weights"]
            if row["sqnr_db"] is not None
            for node in row.get("nodes", [])
        ]
    scored.sort()
    return list(dict.fromkeys(node for _, node in scored))
