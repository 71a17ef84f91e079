"""Which move the search makes next, from what the earlier ones showed: the policy of the search,
apart from its mechanics (engines.search.autotune builds, screens, times and scores).

- An INT8 candidate that fails (on the screening slice or the full evaluation) is rescued at once:
  first with the accuracy-aware float fallback (engines.quantize.budget keeps the fewest nodes in
  float that bring it within the budget), then, if that fails too, with quantization-aware training.
  Both go to the head of the queue, ahead of the next calibration method.
- A calibration method whose family's first method already failed by far (or already met the
  budget: the same graph, no faster) is held back: methods of one family fail the same way.
- Pruning is held back when the data cannot recover it: with fewer calibration samples than
  recovery training needs, and, once a ratio lost more than the budget after recovery, at every
  larger ratio (and at INT8 of the same ratio).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from engines.search.methods import family
from engines.search.space import Candidate, SearchSpace

#: A candidate within this much of the budget (screening drop or full) "came close": the other
#: methods of its calibration family may still make it.
NEAR_MISS = 0.02
#: Recovery training (distillation on the calibration set) needs at least this many samples, and at
#: least this many per output class: fewer, and the pruned network learns the samples, not the task
#: (issue 20: EfficientNet-Lite pruned 0.3, recovered on 128 ImageNet crops, lost 66 points).
RECOVERY_MIN_SAMPLES = 200
#: A float fallback at this share of the original's cost or more does not pay for being INT8.
FALLBACK_PAYS = 0.9
RECOVERY_SAMPLES_PER_CLASS = 2


def pruning_key(candidate: Candidate) -> tuple[float, tuple[tuple[str, float], ...]]:
    return (candidate.prune_ratio, candidate.layer_ratios)


def pruning_text(candidate: Candidate) -> str:
    if candidate.layer_ratios:
        return "pruning (sensitivity)"
    return f"pruning at {candidate.prune_ratio:g}" if candidate.prune_ratio else "unpruned"


def recovery_samples_needed(classes: int | None) -> int:
    """The fewest calibration samples recovery training is given a pruned network to learn from."""
    return max(RECOVERY_MIN_SAMPLES, RECOVERY_SAMPLES_PER_CLASS * (classes or 0))


@dataclass
class _FamilyResult:
    name: str
    status: str
    drop: float | None


@dataclass
class Moves:
    """What the search learned so far that decides its next moves."""

    space: SearchSpace
    allowed: float
    calibration_samples: int
    classes: int | None = None  # the model's output classes, when its output reads as class scores
    families: dict[tuple[Any, ...], _FamilyResult] = field(default_factory=dict)
    fallbacks: set[tuple[Any, ...]] = field(default_factory=set)
    qat: set[tuple[Any, ...]] = field(default_factory=set)
    # uniform ratio -> drop after recovery, for prunings that broke the budget (fp32)
    pruning_losses: dict[float, float] = field(default_factory=dict)
    pruned_fp32_losses: dict[tuple[Any, ...], float] = field(default_factory=dict)

    @staticmethod
    def is_plain_int8(candidate: Candidate) -> bool:
        """A post-training INT8 candidate as the space lists it (not a fallback, not QAT)."""
        return candidate.precision == "int8" and not candidate.float_fallback and not candidate.qat_epochs

    # ------------------------------------------------------------ held back before it is built

    def held_back(self, candidate: Candidate) -> str | None:
        """Why the candidate is not worth building, from the earlier outcomes; None to build it."""
        if self.is_plain_int8(candidate) and candidate.calibration:
            kin = family(candidate.calibration)
            first = self.families.get((candidate.backend, pruning_key(candidate), kin))
            if first is not None and first.name != candidate.calibration:
                if first.status == "accepted":
                    return (
                        f"held back: {first.name}, of the same calibration family ({kin}), met the "
                        f"budget; {candidate.calibration} builds the same graph, no faster"
                    )
                if first.drop is not None and first.drop > self.allowed + NEAR_MISS:
                    return (
                        f"held back: {first.name}, of the same calibration family ({kin}), lost "
                        f"{first.drop * 100:.2f} pt (budget {self.allowed * 100:.2f} pt); "
                        f"{candidate.calibration} fails the same way"
                    )
        if candidate.pruned:
            return self._pruning_held_back(candidate)
        return None

    def _pruning_held_back(self, candidate: Candidate) -> str | None:
        recovers = self.space.finetune_epochs > 0
        if candidate.prune_ratio and not candidate.layer_ratios and recovers:
            needed = recovery_samples_needed(self.classes)
            if self.calibration_samples < needed:
                per_class = (
                    f" ({RECOVERY_SAMPLES_PER_CLASS} per class of {self.classes} outputs, at least "
                    f"{RECOVERY_MIN_SAMPLES})"
                    if self.classes and needed > RECOVERY_MIN_SAMPLES
                    else ""
                )
                return (
                    f"held back: recovery training would learn from {self.calibration_samples} "
                    f"calibration samples, fewer than the {needed} it needs{per_class}; give a "
                    "larger calibration set, or run a sensitivity analysis for per-layer ratios "
                    "that need no recovery"
                )
            for ratio, drop in sorted(self.pruning_losses.items()):
                if ratio < candidate.prune_ratio:
                    return (
                        f"held back: ratio {ratio:g} already lost {drop * 100:.2f} pt after recovery on "
                        f"{self.calibration_samples} samples (budget {self.allowed * 100:.2f} pt)"
                    )
        lost = self.pruned_fp32_losses.get(pruning_key(candidate))
        if candidate.precision != "fp32" and lost is not None:
            return (
                f"held back: {pruning_text(candidate)} already lost {lost * 100:.2f} pt in fp32 "
                f"(budget {self.allowed * 100:.2f} pt); {candidate.precision} only loses more"
            )
        return None

    # ------------------------------------------------------------ after a candidate ends

    def record(
        self, candidate: Candidate, status: str, drop: float | None, *, cost_ratio: float = float("inf")
    ) -> list[Candidate]:
        """Learn from a finished candidate; returns the moves to make next (at the queue's head).

        `cost_ratio`: its cost over the original's, timed side by side (inf when not timed). A float
        fallback that met the budget but had to keep so much in float that it no longer pays (at
        least FALLBACK_PAYS of the original's cost) is rescued by QAT like one that failed: on
        EfficientNet-Lite0 every fallback that met a 1 % fidelity budget ran at 0.91-1.18x the
        original's cost."""
        over = status == "rejected_accuracy" and drop is not None and drop > self.allowed
        if candidate.float_fallback and status == "accepted" and cost_ratio >= FALLBACK_PAYS:
            return self._rescue(candidate)
        if self.is_plain_int8(candidate) and candidate.calibration:
            key = (candidate.backend, pruning_key(candidate), family(candidate.calibration))
            self.families.setdefault(key, _FamilyResult(candidate.calibration, status, drop))
        if candidate.pruned and candidate.precision == "fp32" and over:
            assert drop is not None
            self.pruned_fp32_losses[pruning_key(candidate)] = drop
            if candidate.prune_ratio and not candidate.layer_ratios and self.space.finetune_epochs:
                self.pruning_losses[candidate.prune_ratio] = drop
        if candidate.precision == "int8" and over and not candidate.qat_epochs:
            return self._rescue(candidate)
        return []

    def skipped(self, candidate: Candidate) -> list[Candidate]:
        """A fallback skipped for time leaves QAT to rescue its INT8 (its cost is its own)."""
        return self._rescue(candidate) if candidate.float_fallback else []

    def _rescue(self, candidate: Candidate) -> list[Candidate]:
        """The float fallback for a post-training INT8 that broke the budget (once per pruning and
        calibration family: on one backend, since which nodes must stay float depends on the model
        and the method, and each fallback costs several INT8 builds and evaluations); QAT once that
        fails too (once per backend and pruning)."""
        where = (candidate.backend, pruning_key(candidate))
        if self.space.float_fallback and not candidate.float_fallback:
            key = (pruning_key(candidate), family(candidate.calibration or "minmax"))
            if key not in self.fallbacks:
                self.fallbacks.add(key)
                return [replace(candidate, float_fallback=True)]
        if self.space.qat_epochs > 0 and where not in self.qat:
            self.qat.add(where)
            epochs = self.space.qat_epochs
            return [replace(candidate, calibration=None, float_fallback=False, qat_epochs=epochs)]
        return []
