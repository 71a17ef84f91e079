"""The per-layer INT8 report as people act on it: each node's own error first, named as in the model.

The stored report (engines.quantize.layer_errors) ranks tensors by the error accumulated up to them,
so the logits always came first (every error before them adds up there), weights were named by
their initializer (`onnx::Conv_39`) and "—" was unexplained. Here each row gains:

- `own_error`: the error this node adds on its own (its quantizer, its input in float), as the
  relative RMS error of its output (noise / signal: 0.01 = 1 %), from its SQNR;
- `accumulated_error`: the same measure of the INT8 model's tensor against the float model's;
- `node`: the node's name in the model (a weight's first consumer; a tensor without a producing
  node, such as a graph input, by its own name);

rows are sorted by `own_error`, highest first (unmeasured last), and the body carries a `legend`.
Reports stored before `own_sqnr_db` existed are read as well (their folded Relu/Clip rows have no
own figure: "—").
"""

from __future__ import annotations

from typing import Any

#: What each column means, and "—".
LEGEND = {
    "node": "the node's name in the model (a weight: the node that reads it)",
    "op_type": "the node's operator",
    "own_error": "the error this node adds on its own: its INT8 quantizer with float inputs, as the "
    "relative RMS error of its output (0.01 = 1 %); rows are sorted by it, highest first",
    "accumulated_error": "the error of the INT8 model at this tensor against the float model: "
    "everything before it adds up here, so the last layers always score high",
    "own_sqnr_db": "own_error as a signal-to-quantization-noise ratio in dB (higher is better)",
    "model_sqnr_db": "accumulated_error in dB (higher is better)",
    "quantized_node": "the node whose quantizer this row measures (a Relu or Clip folded into the "
    "range of the op before it is measured with that op)",
    "tensor": "the activation tensor measured",
    "weight": "the weight (initializer) measured",
    "—": "not measured: ONNX Runtime kept the tensor in float, or the figure was not finite (a "
    "tensor of zeros), or the report predates the measure",
    "keep in float": "start a job with these nodes in recipe `quantize.nodes_to_exclude` (by `node`)",
}


def relative_error(sqnr_db: float | None) -> float | None:
    """Noise / signal RMS from an SQNR in dB (20·log10(signal / noise))."""
    return None if sqnr_db is None else 10 ** (-sqnr_db / 20)


def _by_own_error(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda row: (row["own_error"] is None, -(row["own_error"] or 0.0)))


def _activation(row: dict[str, Any]) -> dict[str, Any]:
    own = row.get("own_sqnr_db", row.get("local_sqnr_db"))
    return {
        **row,
        "node": row.get("node") or row.get("tensor", ""),
        "own_sqnr_db": own,
        "own_error": relative_error(own),
        "accumulated_error": relative_error(row.get("model_sqnr_db")),
    }


def _weight(row: dict[str, Any]) -> dict[str, Any]:
    nodes = row.get("nodes") or []
    return {
        **row,
        "node": nodes[0] if nodes else row.get("weight", ""),
        "own_sqnr_db": row.get("sqnr_db"),
        "own_error": relative_error(row.get("sqnr_db")),
        "accumulated_error": None,
    }


def layer_view(report: dict[str, Any]) -> dict[str, Any]:
    """The stored report with each row's own and accumulated error and its node name, sorted by
    own error, and the legend."""
    return {
        **report,
        "activations": _by_own_error([_activation(row) for row in report.get("activations", [])]),
        "weights": _by_own_error([_weight(row) for row in report.get("weights", [])]),
        "sorted_by": "own_error",
        "legend": LEGEND,
    }
