"""Accuracy-aware INT8: keep the most error-prone nodes in float until an accuracy budget holds.

Nodes are ranked by the error their own Q/DQ adds (engines.quantize.layer_errors), then kept in float
1, 2, 4, … at a time, re-quantizing and re-evaluating each time, until the drop against the
float model is within the budget. When no split meets it, the best one found is returned, and
the result says plainly that the budget was missed, with the numbers. A candidate that cannot be
quantized or run is a step with its reason, not the end of the search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import Runner
from engines.backends.registry import get_backend
from engines.errors import EngineError, InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.measure.accuracy import classification_accuracy, fidelity, fidelity_score, run_dataset
from engines.quantize.int8 import QuantizeConfig, QuantizeResult
from engines.quantize.layer_errors import layer_errors, most_harmful_nodes

#: What a budget can be measured in: top-1 against labels, or fidelity to the original.
BUDGET_METRICS = ("top1", "fidelity")


@dataclass(frozen=True)
class AccuracyBudget:
    """Keep the most error-prone nodes in float until the drop against the float model is at most
    `max_drop` (a fraction: 0.01 is one point of top-1; for `fidelity`, the cosine similarity to the
    float model's outputs, and for class scores the top-1 agreement too, stay at or above 1 - max_drop)."""

    metric: str = "top1"
    max_drop: float = 0.01


#: quantize(config, out_path) -> QuantizeResult, with everything but the exclusions fixed by the caller.
Quantizer = Callable[[QuantizeConfig, Path], QuantizeResult]


def score_outputs(outputs: np.ndarray, evaluation: Dataset, metric: str, reference: np.ndarray) -> float:
    """Top-1 against labels, or fidelity to the original (engines.measure.accuracy.fidelity_score)."""
    try:
        if metric == "top1":
            assert evaluation.labels is not None
            return classification_accuracy(outputs, evaluation.labels)["top1"]
        with np.errstate(all="ignore"):
            return fidelity_score(fidelity(outputs, reference))
    except (ValueError, IndexError) as exc:  # outputs a metric cannot read (no class scores, empty)
        raise EngineError(
            f"{metric} cannot be computed on these outputs: {exc}", code="outputs_not_comparable"
        ) from exc


#: The ops whose INT8 kernels carry the speed; everything else is cheap next to them.
HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def light_nodes(float_path: Path) -> tuple[str, ...]:
    """Names of the nodes that are not heavy ops (engines.quantize.int8 names every node)."""
    from onnx import load

    return tuple(
        node.name
        for node in load(str(float_path), load_external_data=False).graph.node
        if node.op_type not in HEAVY_OPS
    )


#: An ONNX model -> an active runner of the backend the engine is built for (accuracy is checked on
#: what will run, not on a stand-in).
RunnerFor = Callable[[Path], Runner]


def cpu_runner(path: Path) -> Runner:
    """The default: ONNX Runtime on this CPU."""
    return get_backend("onnxruntime-cpu").load(path)


def _outputs(runner_for: RunnerFor, path: Path, evaluation: Dataset, batch_size: int) -> np.ndarray:
    with runner_for(path) as runner:
        return run_dataset(runner, evaluation, batch_size)


def quantize_within_budget(
    float_path: Path,
    quantize: Quantizer,
    config: QuantizeConfig,
    budget: AccuracyBudget,
    *,
    evaluation: Dataset,
    calibration: Dataset,
    batch_size: int,
    workdir: Path,
    check_cancelled: Callable[[], None] = lambda: None,
    runner_for: RunnerFor = cpu_runner,
) -> QuantizeResult:

    def _score(path: Path) -> float:
        outputs = _outputs(runner_for, path, evaluation, batch_size)
        return score_outputs(outputs, evaluation, budget.metric, reference)

    if budget.metric == "top1" and evaluation.labels is None:
        raise InvalidRecipeError(
            "an accuracy budget on top1 needs an evaluation set with labels; use fidelity"
        )
    result = quantize(config, workdir / "int8-all.onnx")
    try:
        reference = _outputs(runner_for, float_path, evaluation, batch_size)
        float_score = (
            score_outputs(reference, evaluation, budget.metric, reference) if budget.metric == "top1" else 1.0
        )
        drop = float_score - _score(result.path)
    except EngineError as exc:
        if exc.code != "outputs_not_comparable":
            raise
        result.metadata["accuracy_budget"] = {
            "metric": budget.metric,
            "max_drop": budget.max_drop,
            "met": None,
        }
        result.messages.append(f"accuracy budget not searched: {exc.detail}; every node is quantized")
        return result
    steps: list[dict[str, Any]] = [{"kept_float": 0, "drop": drop, "strategy": "every node quantized"}]
    best, best_drop, best_strategy = result, drop, steps[0]["strategy"]
    ranked: list[str] = []
    unranked: list[str] = []
    base: tuple[str, ...] = ()

    def attempt(extra: tuple[str, ...], name: str, strategy: str) -> tuple[str, ...] | None:
        """Quantize with `extra` nodes kept in float (the recipe's own stay float too); keep the best."""
        nonlocal best, best_drop, best_strategy
        check_cancelled()
        excluded = tuple(dict.fromkeys((*config.nodes_to_exclude, *extra)))
        try:
            candidate = quantize(replace(config, nodes_to_exclude=excluded), workdir / f"int8-{name}.onnx")
            drop = float_score - _score(candidate.path)
        except InvalidRecipeError:
            raise
        except EngineError as exc:
            steps.append(
                {"kept_float": len(extra), "drop": None, "strategy": strategy, "error": exc.detail[:300]}
            )
            return None
        steps.append({"kept_float": len(extra), "drop": drop, "strategy": strategy})
        if drop < best_drop:
            best, best_drop, best_strategy = candidate, drop, strategy
            return extra
        return None

    if drop > budget.max_drop:
        # First the cheap, usually decisive split: only the heavy ops (Conv, MatMul, Gemm) in INT8,
        # elementwise arithmetic in float. Decomposed LayerNorm and GELU (tf2onnx, jax2tf) lose most
        # of their accuracy in quantized Add and Mul, and the heavy ops keep most of the speed.
        light = light_nodes(float_path)
        base = (attempt(light, "heavy-only", "only Conv/MatMul/Gemm quantized") if light else None) or ()
    if best_drop > budget.max_drop:
        report = layer_errors(float_path, result.path, calibration, batch_size=batch_size, workdir=workdir)
        ranked = [node for node in most_harmful_nodes(report) if node not in base]
        unranked = [f"{item['part']}: {item['reason']}" for item in report["unavailable"]]
        count = 1
        while best_drop > budget.max_drop and ranked:
            keep = tuple(ranked[: min(count, len(ranked))])
            attempt(
                (*base, *keep),
                f"keep{len(keep)}",
                f"{len(keep)} most harmful nodes in float" + (" too" if base else ""),
            )
            if len(keep) == len(ranked):
                break
            count *= 2
    met = best_drop <= budget.max_drop
    best.metadata["accuracy_budget"] = {
        "metric": budget.metric,
        "max_drop": budget.max_drop,
        "float_score": float_score,
        "drop": best_drop,
        "met": met,
        "steps": steps,
        "strategy": best_strategy,
        "why_float": "elementwise ops first, then the nodes whose quantization adds the most error on "
        "calibration samples (engines.quantize.layer_errors)",
    }
    kept = len(best.metadata["nodes_kept_float"])
    if ranked and set(ranked) <= set(best.metadata["nodes_kept_float"]):
        best.messages.append(
            "every ranked node had to stay in float to meet the budget: this 'int8' model computes in float; "
            "the float engine is the honest choice"
        )
    if not met and not ranked:
        best.messages.append(
            "accuracy budget not searched: no per-layer ranking could be computed"
            + (f" ({'; '.join(unranked)})" if unranked else "")
        )
    if not met:
        best.messages.append(
            f"accuracy budget missed: the best INT8 model drops {best_drop * 100:.2f} pt of {budget.metric} "
            f"(budget {budget.max_drop * 100:.2f} pt) with {kept} nodes in float"
        )
    elif len(steps) > 1:
        best.messages.append(
            f"accuracy budget met: {best_strategy}, {kept} nodes kept in float "
            f"(drop {best_drop * 100:.2f} pt of {budget.metric})"
        )
    return best
