"""Where an engine came from, in one shape for every table: the search's candidates, a recipe's
engines, and the API's engine records.

A pruned-0.3 candidate read "fp32 onnxruntime-cpu" in the job's comparison table, the same as the
unpruned engine: backend and precision are not a lineage. This module writes the rest beside them,
from what the records already hold (a search candidate, an engine's build_info, its job's recipe):

- `backend`, `precision`;
- `pruning`: {"criterion", "ratio"} (ratio null for per-layer ratios from a sensitivity
  analysis, with `layers`), or null;
- `fallback_nodes`: how many nodes an INT8 model keeps in float (the accuracy-budget fallback and
  the recipe's `quantize.nodes_to_exclude`), null where nothing is quantized;
- `calibration`: the INT8 method, or null;
- `qat`: whether INT8 was trained with its quantization;
- `label`: the short line people read, e.g.
  "int8 onnxruntime-cpu · pruned 30 % (l1) · minmax · 3 in float".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The separator of a label's parts.
SEPARATOR = " · "
#: Precisions calibrated on data (their method is a lineage step).
_CALIBRATED = ("int8",)


def make_lineage(
    backend: str,
    precision: str,
    *,
    pruning: Mapping[str, Any] | None = None,
    fallback_nodes: int | None = None,
    calibration: str | None = None,
    qat: bool = False,
) -> dict[str, Any]:
    """The lineage dict, its label written from its parts."""
    parts = [f"{precision} {backend}"]
    if pruning:
        ratio = pruning.get("ratio")
        criterion = pruning.get("criterion") or "l1"
        amount = "per-layer ratios" if not ratio else f"{float(ratio) * 100:g} %"
        parts.append(f"pruned {amount} ({criterion})")
    if calibration:
        parts.append(calibration)
    if qat:
        parts.append("QAT")
    if fallback_nodes:
        parts.append(f"{fallback_nodes} in float")
    return {
        "backend": backend,
        "precision": precision,
        "pruning": dict(pruning) if pruning else None,
        "fallback_nodes": fallback_nodes,
        "calibration": calibration,
        "qat": qat,
        "label": SEPARATOR.join(parts),
    }


def _pruning(
    criterion: str | None, ratio: float | None, layer_ratios: Mapping[str, float] | None
) -> dict | None:
    if layer_ratios:
        return {"criterion": criterion or "l1", "ratio": None, "layers": len(layer_ratios)}
    if ratio:
        return {"criterion": criterion or "l1", "ratio": float(ratio)}
    return None


def _kept_float(metadata: Mapping[str, Any] | None, precision: str) -> int | None:
    """Nodes an INT8 model keeps in float, from its build metadata (None: not an INT8 build)."""
    if not metadata or precision not in _CALIBRATED:
        return None
    kept = metadata.get("nodes_kept_float")
    return len(kept) if isinstance(kept, list) else None


def _trained(metadata: Mapping[str, Any] | None) -> bool:
    return bool(metadata) and any("qat" in str(key) for key in metadata)  # type: ignore[union-attr]


def candidate_lineage(
    candidate: Mapping[str, Any], *, criterion: str | None = None, metadata: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A search candidate's lineage (its fields as `Candidate.fields()` writes them, or an older
    report's `lineage`), with what its build recorded (`metadata`: the nodes kept in float). The
    candidate's own fields stay beside the contract's keys (`prune_ratio`, `float_fallback`, …)."""
    precision = str(candidate.get("precision", ""))
    lineage = make_lineage(
        str(candidate.get("backend", "")),
        precision,
        pruning=_pruning(criterion, candidate.get("prune_ratio"), candidate.get("layer_ratios")),
        fallback_nodes=_kept_float(metadata, precision),
        calibration=candidate.get("calibration") if precision in _CALIBRATED else None,
        qat=bool(candidate.get("qat_epochs")) or _trained(metadata),
    )
    extra = {key: value for key, value in candidate.items() if key not in lineage}
    return {**extra, **lineage}


def engine_lineage(
    backend: str, precision: str, build_info: Mapping[str, Any], recipe: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A stored engine's lineage: a search's engine from the candidate it records (`lineage`), a
    recipe's from its build metadata and its job's recipe (`prune` in build_info: the engine was
    built from the pruned model)."""
    recipe = recipe or {}
    found = build_info.get("lineage")
    if isinstance(found, Mapping):
        space = recipe.get("space")
        criterion = space.get("prune_method") if isinstance(space, Mapping) else None
        return candidate_lineage(
            {**found, "backend": backend, "precision": precision}, criterion=criterion, metadata=build_info
        )
    pruning = None
    built = build_info.get("prune")  # the prune stage's metadata: the engine starts from the pruned model
    if isinstance(built, Mapping):
        stated = recipe.get("prune") if isinstance(recipe.get("prune"), Mapping) else {}
        pruning = _pruning(
            built.get("method") or stated.get("method"),
            built.get("ratio", built.get("sparsity_target")),
            stated.get("layer_ratios"),
        ) or {"criterion": built.get("method") or stated.get("method") or "l1", "ratio": None}
    calibration = build_info.get("calibration") if precision in _CALIBRATED else None
    return make_lineage(
        backend,
        precision,
        pruning=pruning,
        fallback_nodes=_kept_float(build_info, precision),
        calibration=calibration if isinstance(calibration, str) else None,
        qat=_trained(build_info),
    )


def original_lineage(backend: str) -> dict[str, Any]:
    """The original model, as the reference backend runs it."""
    lineage = make_lineage(backend, "fp32")
    lineage["label"] = f"original ({backend} fp32)"
    return lineage
