"""The auto-optimize form's options, defaults and limits, read from the API's own request schema
(`AutotuneCreate`, the body of POST /v1/models/{id}/optimize) and from the search's defaults
(`engines.search.space.SearchSpace`), so that the console never offers a default or a limit the
server does not have: a change to either shows up in the form without touching the template.
"""

from __future__ import annotations

from typing import Any

from app.api.schemas import AutotuneCreate
from engines.search.space import SearchSpace

#: The largest drop the console lets a person type, as a fraction (0.5 = 50 points): beyond it the
#: API refuses `max_drop` for top1 and fidelity (a 1 meant "1 point" far more often than "100").
MAX_SENSIBLE_DROP = 0.5


def _number(prop: dict[str, Any]) -> dict[str, Any]:
    """default, min and max of a numeric property, `anyOf [number, null]` (optional) included."""
    bounds = next((option for option in prop.get("anyOf", [prop]) if option.get("type") != "null"), prop)
    return {
        "default": prop.get("default"),
        "min": bounds.get("minimum"),
        "max": bounds.get("maximum"),
        "integer": bounds.get("type") == "integer",
    }


def _choices(prop: dict[str, Any]) -> list[str]:
    """The enum of a property, or of the items of an optional list property."""
    if "enum" in prop:
        return list(prop["enum"])
    for option in prop.get("anyOf", []):
        if option.get("type") == "array":
            return list(option["items"]["enum"])
    return []


def autotune_form() -> dict[str, Any]:
    """Everything the template needs to draw the form; see the module docstring for why."""
    schema = AutotuneCreate.model_json_schema()
    defs, top = schema["$defs"], schema["properties"]
    budget = defs["SearchBudgetIn"]["properties"]
    objective = defs["ObjectiveIn"]["properties"]
    space = defs["SearchSpaceIn"]["properties"]
    graph = defs["GraphOptimizationIn"]["properties"]
    searched = SearchSpace()
    max_drop = _number(budget["max_drop"])
    prune_items = next(option for option in space["prune_ratios"]["anyOf"] if option.get("type") == "array")
    return {
        "budget_metrics": _choices(budget["metric"]),
        "budget_metric": budget["metric"]["default"],
        # the form speaks of points (or percent, relative): the API's fraction × 100
        "max_drop_points": round(100 * max_drop["default"], 4),
        "max_drop_points_max": round(100 * min(max_drop["max"], MAX_SENSIBLE_DROP), 4),
        "relative": budget["relative"]["default"],
        "objective_metrics": _choices(objective["metric"]),
        "objective_metric": objective["metric"]["default"],
        "batch_size": _number(objective["batch_size"]),
        "sequence_length": _number(objective["sequence_length"]),
        "time_budget": _number(top["time_budget_minutes"]),
        "precisions": _choices(space["precisions"]),
        "default_precisions": list(searched.precisions),
        "calibrations": _choices(space["calibrations"]),
        "default_calibrations": list(searched.calibrations),
        "prune_ratios": ", ".join(f"{ratio:g}" for ratio in searched.prune_ratios),
        "prune_ratios_max_items": prune_items.get("maxItems"),
        "prune_methods": _choices(space["prune_method"]),
        "prune_method": space["prune_method"]["default"],
        "finetune_epochs": _number(space["finetune_epochs"]),
        "float_fallback": space["float_fallback"]["default"],
        "max_full_evaluations": _number(space["max_full_evaluations"]),
        "qat_epochs": _number(space["qat_epochs"]),
        "sensitivity": space["sensitivity"]["default"],
        "graph_modes": _choices(graph["model_type"]),
        "graph_mode": graph["model_type"]["default"],
        "help": {
            "evaluation": top["evaluation_dataset_id"].get("description", ""),
            "calibration": top["calibration_dataset_id"].get("description", ""),
            "qat_epochs": space["qat_epochs"].get("description", ""),
            "sensitivity": space["sensitivity"].get("description", ""),
            "sequence_length": objective["sequence_length"].get("description", ""),
            "space": defs["SearchSpaceIn"].get("description", ""),
            "budget": defs["SearchBudgetIn"].get("description", ""),
        },
    }
