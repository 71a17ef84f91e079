"""The search's moves (engines.search.moves, issue 20): an INT8 candidate that fails is rescued by the
float fallback, then by QAT; calibration methods of a family that failed are held back; pruning the
data cannot recover is held back with the reason; skipped moves carry what they would have cost;
a search where nothing beats the original says the original is served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.ingest.datasets import Dataset
from engines.search import report as search_report
from engines.search.autotune import AutotuneRequest, autotune
from engines.search.methods import family, family_first
from engines.search.moves import Moves
from engines.search.space import Budget, Candidate, Objective, SearchSpace, candidates

ORT = "onnxruntime-cpu"


def _space(**changes: object) -> SearchSpace:
    base = {"backends": (ORT,), "precisions": ("int8",), "calibrations": ("minmax",), "prune_ratios": ()}
    return SearchSpace(**{**base, **changes})  # type: ignore[arg-type]


# ---------------------------------------------------------------- the policy


def test_a_failed_int8_goes_to_the_fallback_then_to_qat_once() -> None:
    moves = Moves(_space(qat_epochs=2), allowed=0.01, calibration_samples=512)
    int8 = Candidate(ORT, "int8", "minmax")
    [fallback] = moves.record(int8, "rejected_accuracy", 0.25)  # screened out at 25 pt
    assert fallback.float_fallback and fallback.calibration == "minmax"
    [qat] = moves.record(fallback, "rejected_accuracy", 0.08)
    assert qat.qat_epochs == 2 and qat.calibration is None and not qat.float_fallback
    assert qat.label() == f"{ORT} int8 qat 2e" and qat.lineage()["qat_epochs"] == 2
    assert moves.record(qat, "rejected_accuracy", 0.05) == []  # QAT is the last move
    assert moves.record(int8, "accepted", 0.005) == []
    no_fallback = Moves(_space(float_fallback=False), allowed=0.01, calibration_samples=512)
    assert no_fallback.record(int8, "rejected_accuracy", 0.25)[0].qat_epochs == 3
    neither = Moves(_space(float_fallback=False, qat_epochs=0), allowed=0.01, calibration_samples=512)
    assert neither.record(int8, "rejected_accuracy", 0.25) == []


def test_methods_of_a_family_that_failed_by_far_are_held_back() -> None:
    moves = Moves(_space(), allowed=0.01, calibration_samples=512)
    first, second = "minmax", "entropy"
    moves.record(Candidate(ORT, "int8", first), "rejected_accuracy", 0.25)
    held = moves.held_back(Candidate(ORT, "int8", second))
    if family(first) == family(second):  # the registry groups ONNX Runtime's calibrators
        assert held and "lost 25.00 pt" in held and "fails the same way" in held
    else:
        assert held is None
    assert moves.held_back(Candidate("openvino-cpu", "int8", second)) is None  # another backend
    near = Moves(_space(), allowed=0.01, calibration_samples=512)
    near.record(Candidate(ORT, "int8", first), "rejected_accuracy", 0.015)  # came close
    assert near.held_back(Candidate(ORT, "int8", second)) is None


def test_the_default_calibrations_try_one_method_per_family_first() -> None:
    order = SearchSpace().calibrations
    firsts, rest = family_first(order)
    assert order == firsts + rest and len({family(name) for name in firsts}) == len(firsts)
    assert order[0] == "minmax"
    space = SearchSpace(calibrations=order, prune_ratios=(0.3,))
    found = candidates(space, [ORT], {ORT: ("fp32", "fp16", "int8")}, can_prune=True)
    labels = [candidate.label() for candidate in found]
    pruned = labels.index(f"{ORT} pruned 0.3 fp32")
    assert all(labels.index(f"{ORT} int8 {name}") < pruned for name in firsts)
    assert all(labels.index(f"{ORT} int8 {name}") > pruned for name in rest)


def test_pruning_the_data_cannot_recover_is_held_back_with_the_reason() -> None:
    space = _space(prune_ratios=(0.3, 0.5))
    few = Moves(space, allowed=0.01, calibration_samples=128, classes=1000)
    held = few.held_back(Candidate(ORT, "fp32", prune_ratio=0.3))
    assert held and "128 calibration samples, fewer than the 2000" in held and "per class of 1000" in held
    sensitivity = Candidate(ORT, "fp32", layer_ratios=(("conv1", 0.3),))
    assert few.held_back(sensitivity) is None  # measured within the budget without recovery

    enough = Moves(space, allowed=0.01, calibration_samples=4096, classes=1000)
    pruned = Candidate(ORT, "fp32", prune_ratio=0.3)
    assert enough.held_back(pruned) is None
    enough.record(pruned, "rejected_accuracy", 0.66)
    larger = enough.held_back(Candidate(ORT, "fp32", prune_ratio=0.5))
    assert (
        larger == "held back: ratio 0.3 already lost 66.00 pt after recovery on 4096 samples (budget 1.00 pt)"
    )
    same_int8 = enough.held_back(Candidate(ORT, "int8", "minmax", prune_ratio=0.3))
    assert same_int8 and "already lost 66.00 pt in fp32" in same_int8


# ---------------------------------------------------------------- the search, in-process


@pytest.fixture(scope="module")
def small_net(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    """A small random-weight CNN (its INT8 breaks a zero budget), 96 samples: the budget is on fidelity."""
    import torch
    from torch import nn

    from examples.digits import export_onnx

    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip
    path = export_onnx(module, tmp_path_factory.mktemp("moves") / "net.onnx", shape=(3, 32, 32))
    data = Dataset({"input": np.random.default_rng(0).random((96, 3, 32, 32), dtype=np.float32)}, None)
    return path, data


def test_a_failed_int8_is_rescued_in_the_search(small_net, tmp_path: Path) -> None:
    """INT8 breaks a zero budget: the fallback follows it at once (before the next method), then
    QAT; pruning on 96 samples is held back, said why; the report lists what was not tried."""
    path, data = small_net
    space = _space(precisions=("fp32", "int8"), calibrations=("minmax", "entropy"), prune_ratios=(0.3,),
                   qat_epochs=1, finetune_epochs=1)  # fmt: skip
    request = AutotuneRequest(Objective("latency", 8), Budget("fidelity", 0.0), 120.0, space)
    result = autotune(path, request, tmp_path, evaluation=data, calibration=data)
    rows = result.report(request.objective, request.budget)["candidates"]
    labels = [row["label"] for row in rows]
    int8 = labels.index(f"{ORT} int8 minmax")
    assert rows[int8]["status"] == "rejected_accuracy"
    assert labels[int8 + 1] == f"{ORT} int8 minmax + float fallback"
    fallback = rows[int8 + 1]
    if fallback["status"] != "accepted":  # the fallback missed too: QAT is next
        assert labels[int8 + 2] == f"{ORT} int8 qat 1e"
    held = next(row for row in rows if row["label"] == f"{ORT} pruned 0.3 fp32")
    assert held["status"] == "held_back" and "96 calibration samples" in held["reason"]
    assert "Held back:" in search_report.markdown(result.report(request.objective, request.budget))


def test_qat_follows_a_failed_int8_when_the_fallback_is_off(small_net, tmp_path: Path) -> None:
    path, data = small_net
    space = _space(float_fallback=False, qat_epochs=1)
    request = AutotuneRequest(Objective("latency", 8), Budget("fidelity", 0.0), 120.0, space)
    result = autotune(path, request, tmp_path, evaluation=data, calibration=data)
    labels = [outcome.candidate.label() for outcome in result.outcomes]
    assert labels == [f"{ORT} int8 minmax", f"{ORT} int8 qat 1e"]
    qat = result.outcomes[1]
    # trained, or failed with its reason (a build without a QAT stage): never the end of the search
    assert qat.status != "failed" or qat.reason.startswith("qat_unavailable")
    assert qat.estimated_seconds is not None and qat.estimated_seconds > 0  # from a measured step


def test_skipped_moves_say_what_they_would_have_cost(small_net, tmp_path: Path) -> None:
    path, data = small_net
    space = _space(precisions=("fp32", "int8"))
    request = AutotuneRequest(Objective("latency", 1), Budget("fidelity", 0.05), 0.5, space)
    result = autotune(path, request, tmp_path, evaluation=data, calibration=data)
    skipped = [outcome for outcome in result.outcomes if outcome.status == "skipped_time"]
    assert skipped and all(outcome.estimated_seconds and outcome.estimated_seconds > 0 for outcome in skipped)
    assert all(outcome.reason.startswith("it would take ~") for outcome in skipped)
    report = result.report(request.objective, request.budget)
    assert [row["estimated_seconds"] for row in report["candidates"] if row["status"] == "skipped_time"]
    assert "Skipped for time (about" in search_report.markdown(report)


def test_a_search_that_beats_nothing_says_the_original_is_served(small_net, tmp_path: Path) -> None:
    """fp32 on the reference backend is the original: whatever the timing noise says, the report never
    both names a chosen candidate and says that none beats the original."""
    path, data = small_net
    request = AutotuneRequest(
        Objective("latency", 8), Budget("fidelity", 0.01), 60.0, _space(precisions=("fp32",))
    )
    result = autotune(path, request, tmp_path, evaluation=data, calibration=data)
    report = result.report(request.objective, request.budget)
    says_none = any("no candidate beats the original" in message for message in result.messages)
    names_one = any(message.startswith("chosen:") for message in result.messages)
    assert says_none == report["serves_original"] != names_one
    served = [row for row in report["candidates"] if row["served_as_original"]]
    chosen = [row for row in report["candidates"] if row["chosen"]]
    assert served == (chosen if report["serves_original"] else [])
    if report["serves_original"]:
        assert report["chosen"] == f"the original ({ORT} fp32)"
        assert "chosen: the original" in search_report.markdown(report)
        assert "| served as the original |" in search_report.markdown(report)
