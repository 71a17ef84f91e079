"""Pruning criteria, as objects that say what they need (Torch-Pruning's `Importance` style).

Each criterion declares whether it removes whole channels (structured) or single weights, whether
it needs data (gradients on a calibration set), labels, or BatchNorm layers, and whether a
sensitivity analysis can use it. Every rule about criteria reads these flags: the recipe checks,
the API's enums and validation messages, `GET /v1/capabilities` and so the SDK's choices. A new
criterion is one `Criterion(...)` and one `register(...)` line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engines.errors import InvalidRecipeError


@dataclass(frozen=True)
class Criterion:
    name: str
    summary: str
    structured: bool = True  # whole channels; False: single weights (unstructured sparsity)
    needs_data: bool = False  # takes gradients on the calibration set
    needs_labels: bool = False
    needs_batchnorm: bool = False
    in_sensitivity: bool = True  # cheap enough to rank every layer alone at every ratio
    #: The torch-pruning importance (imported lazily: torch is optional); None for unstructured.
    importance: Callable[[], Any] | None = None

    def check_data(self, has_calibration: bool) -> None:
        """InvalidRecipeError when the criterion needs data and there is no calibration set."""
        if self.needs_data and not has_calibration:
            raise InvalidRecipeError(
                f"the {self.name} criterion needs a calibration dataset to take gradients on"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "structured": self.structured,
            "needs_data": self.needs_data,
            "needs_labels": self.needs_labels,
            "needs_batchnorm": self.needs_batchnorm,
            "in_sensitivity": self.in_sensitivity,
        }


def _tp(name: str, **kwargs: Any) -> Callable[[], Any]:
    def make() -> Any:
        import torch_pruning as tp

        return getattr(tp.importance, name)(**kwargs)

    return make


CRITERIA: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
    CRITERIA[criterion.name] = criterion
    return criterion


def criterion(name: str) -> Criterion:
    """The registered criterion, or InvalidRecipeError naming the registered ones."""
    if name not in CRITERIA:
        raise InvalidRecipeError(f"unknown pruning method '{name}'; use one of {tuple(CRITERIA)}")
    return CRITERIA[name]


register(Criterion("l1", "filter L1 norm (Li et al.)", importance=_tp("GroupMagnitudeImportance", p=1)))
register(
    Criterion(
        "slimming",
        "BatchNorm γ (Network Slimming, Liu et al.)",
        needs_batchnorm=True,
        importance=_tp("BNScaleImportance"),
    )
)
register(
    Criterion(
        "taylor",
        "first-order Taylor expansion of the loss (Molchanov et al.)",
        needs_data=True,
        in_sensitivity=False,  # gradients per candidate: too slow for every layer and ratio
        importance=_tp("GroupTaylorImportance"),
    )
)
register(Criterion("fpgm", "filters near the geometric median (He et al.)", importance=_tp("FPGMImportance")))
register(Criterion("random", "random channels: the control", importance=_tp("RandomImportance")))
register(
    Criterion(
        "magnitude",
        "smallest weights zeroed (Deep Compression): a smaller file, not a faster dense runtime",
        structured=False,
        in_sensitivity=False,
    )
)
