"""Which layer lost my accuracy? Per-tensor quantization error of an INT8 model vs its float model.

For every quantized activation, two signal-to-quantization-noise ratios (dB, higher is better):
`local_sqnr_db` compares the tensor right before and after its own Q/DQ pair (the error this
quantizer adds), `model_sqnr_db` compares the INT8 model's tensor with the float model's (the
error accumulated up to that point). Weights get their SQNR too. Rows come worst first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from engines.datasets import Dataset
from engines.quantize import _reader

#: A handful of samples is enough to rank layers; the report runs both models with every tensor as output.
DEFAULT_SAMPLES = 16
#: Activations whose clipping the Q/DQ range does itself: their "local error" is the activation, not noise.
_FOLDED_ACTIVATIONS = {"Relu", "Clip"}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def layer_errors(
    float_path: Path, qdq_path: Path, samples: Dataset, *, batch_size: int, workdir: Path
) -> dict[str, Any]:
    """Per-tensor error of `qdq_path` against `float_path` on the first few samples."""
    from onnx import load
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        compute_weight_error,
        create_activation_matching,
        create_weight_matching,
        modify_model_output_intermediate_tensors,
    )

    data = samples.take(max(batch_size, min(DEFAULT_SAMPLES, samples.samples)))
    augmented_float, augmented_qdq = workdir / "debug-float.onnx", workdir / "debug-qdq.onnx"
    modify_model_output_intermediate_tensors(str(float_path), str(augmented_float))
    modify_model_output_intermediate_tensors(str(qdq_path), str(augmented_qdq))
    providers = ["CPUExecutionProvider"]
    float_acts = collect_activations(
        str(augmented_float), _reader(data, batch_size), execution_providers=providers
    )
    qdq_acts = collect_activations(
        str(augmented_qdq), _reader(data, batch_size), execution_providers=providers
    )
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    nodes = load(str(float_path)).graph.node
    producers = {output: (node.name, node.op_type) for node in nodes for output in node.output}
    # A folded Relu/Clip has no Q/DQ of its own: its quantization error belongs to the op before it.
    folded_into = {
        node.name: producers.get(node.input[0], ("", ""))[0]
        for node in nodes
        if node.op_type in _FOLDED_ACTIVATIONS
    }
    activations = []
    for tensor, error in errors.items():
        node, op_type = producers.get(tensor, ("", "graph input"))
        folded = op_type in _FOLDED_ACTIVATIONS
        activations.append(
            {
                "tensor": tensor,
                "node": node,
                "op_type": op_type,
                # after a folded Relu the "pre-Q/DQ" tensor is the pre-activation: no local error to report
                "local_sqnr_db": None if folded else _finite(error.get("qdq_err")),
                "model_sqnr_db": _finite(error.get("xmodel_err")),
                "quantized_node": folded_into.get(node, node) if folded else node,
            }
        )
    activations.sort(key=lambda row: (row["model_sqnr_db"] is None, row["model_sqnr_db"] or 0.0))
    weights = [
        {"weight": name, "sqnr_db": _finite(sqnr)}
        for name, sqnr in compute_weight_error(create_weight_matching(str(float_path), str(qdq_path))).items()
    ]
    weights.sort(key=lambda row: (row["sqnr_db"] is None, row["sqnr_db"] or 0.0))
    return {"samples": data.samples, "activations": activations, "weights": weights}


def most_harmful_nodes(report: dict[str, Any]) -> list[str]:
    """Quantized nodes, most harmful first: by the error their own Q/DQ adds (local SQNR), or, for an
    op whose output goes through a folded Relu, by the model SQNR right after it."""
    scored = []
    for row in report["activations"]:
        score = row["local_sqnr_db"] if row["local_sqnr_db"] is not None else row["model_sqnr_db"]
        if row["quantized_node"] and score is not None:
            scored.append((score, row["quantized_node"]))
    scored.sort()
    return list(dict.fromkeys(node for _, node in scored))
