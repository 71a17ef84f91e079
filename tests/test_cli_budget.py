"""The CLI's accuracy budget (optiforge_client.budget): `1%`, `1pt` and `0.01` are one point; a
bare number above 0.2 is refused with the reading it probably meant, before anything is sent."""

from __future__ import annotations

import subprocess
import sys

import pytest
from optiforge_client.budget import MAX_BARE_FRACTION, BudgetError, parse_budget
from optiforge_client.cli import parse_budget as cli_parse_budget

from tests.conftest import REPO_ROOT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1%", (0.01, False)),
        ("1pt", (0.01, False)),
        ("0.01", (0.01, False)),
        ("0.5pt", (0.005, False)),
        ("0.5 %", (0.005, False)),
        ("2.5PT", (0.025, False)),
        ("0", (0.0, False)),
        ("0.2", (0.2, False)),
        ("25%", (0.25, False)),
        ("1%rel", (0.01, True)),
        ("0.02rel", (0.02, True)),
    ],
)
def test_budget_readings(text: str, expected: tuple[float, bool]) -> None:
    assert parse_budget(text) == pytest.approx(expected)
    assert cli_parse_budget is parse_budget  # one parser, in one place


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("0.5", ["50-point", "0.5%", "0.5pt", "0.005"]),
        ("1", ["100-point", "1%", "1pt", "0.01"]),
        ("2", ["200-point", "2%", "0.02"]),
        ("0.5rel", ["0.5%rel"]),
    ],
)
def test_bare_number_over_the_bound_is_refused_with_the_probable_reading(text: str, says: list[str]) -> None:
    assert float(text.removesuffix("rel")) > MAX_BARE_FRACTION
    with pytest.raises(BudgetError) as refused:
        parse_budget(text)
    for part in says:
        assert part in str(refused.value), str(refused.value)


def test_points_over_the_servers_bound_are_refused() -> None:
    assert parse_budget("50%") == pytest.approx((0.5, False))
    with pytest.raises(BudgetError) as refused:
        parse_budget("60%")
    assert "60-point" in str(refused.value) and "at most 50 points" in str(refused.value)
    assert "0.6%" in str(refused.value)


@pytest.mark.parametrize("text", ["", "abc", "-1%", "nan", "inf", "1%%", "pt"])
def test_unreadable_budgets(text: str) -> None:
    with pytest.raises(BudgetError):
        parse_budget(text)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The SDK's CLI against a port nothing listens on: a refusal before any request."""
    return subprocess.run(
        [sys.executable, "-m", "optiforge_client.cli", *args, "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_cli_refuses_a_misread_budget_naming_the_flag(tmp_path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read")
    run = _cli("optimize", str(model), "--eval", str(model), "--budget", "0.5")
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert "--budget" in last and "50-point" in last and "0.5%" in last, run.stderr
    assert "Traceback" not in run.stderr and "cannot reach" not in run.stderr
