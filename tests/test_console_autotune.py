"""The console's auto-optimize form, in Chromium against a live `optiforge serve` (as
tests/test_browser.py drives it): its options and defaults are the API's, the budget reads in
points, and the form starts a real search whose page shows its progress (elapsed, time left, the
best so far), then every candidate with its lineage and why, on a plot whose markers never overlap.
"""

from __future__ import annotations

import httpx
import pytest

from app.api.schemas import AutotuneCreate
from engines.search.space import SearchSpace
from tests.conftest import DigitsArtifacts, LiveStack, wait_for_job
from tests.console_records import unique_dataset, upload
from tests.test_browser import CHROMIUM, _screenshot, _wait_for, browser, page  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)"
)

#: Markers of one plot that overlap: [(key, key)] (none is the rule the plots keep).
OVERLAPPING_MARKERS = """
(figure) => {
  const boxes = [...document.querySelectorAll(`${figure} svg.plot .marks .marker`)]
    .map((node) => ({ key: node.parentNode.dataset.key, box: node.getBoundingClientRect() }));
  const pairs = [];
  boxes.forEach((a, i) => boxes.slice(i + 1).forEach((b) => {
    const apart = a.box.right <= b.box.left || b.box.right <= a.box.left
      || a.box.bottom <= b.box.top || b.box.bottom <= a.box.top;
    if (!apart) pairs.push([a.key, b.key]);
  }));
  return { count: boxes.length, pairs };
}
"""


def _form_value(page, name: str) -> str:  # noqa: F811 - the fixture's value
    return page.locator(f"#auto-optimize [name={name}]").first.input_value()


def test_the_form_offers_the_apis_options_and_defaults(page, embedded_stack: LiveStack) -> None:  # noqa: F811
    page.goto(f"{embedded_stack.base_url}/ui")
    page.wait_for_selector("#who:has-text('no API key needed')")
    defaults = AutotuneCreate.model_validate({"evaluation_dataset_id": "x"})
    space = SearchSpace()
    assert float(_form_value(page, "max_drop")) == pytest.approx(100 * defaults.accuracy_budget.max_drop)
    assert _form_value(page, "budget_metric") == defaults.accuracy_budget.metric
    assert page.locator("#auto-optimize [name=relative]").is_checked() is defaults.accuracy_budget.relative
    assert _form_value(page, "objective_metric") == defaults.objective.metric
    assert int(_form_value(page, "batch_size")) == defaults.objective.batch_size
    assert float(_form_value(page, "time_budget_minutes")) == defaults.time_budget_minutes
    time_budget = page.locator("#auto-optimize [name=time_budget_minutes]")
    field = AutotuneCreate.model_fields["time_budget_minutes"]
    limits = {type(item).__name__: item for item in field.metadata}
    assert float(time_budget.get_attribute("min")) == limits["Ge"].ge
    assert float(time_budget.get_attribute("max")) == limits["Le"].le
    assert int(_form_value(page, "qat_epochs")) == defaults.space.qat_epochs
    assert int(_form_value(page, "finetune_epochs")) == defaults.space.finetune_epochs
    assert int(_form_value(page, "max_full_evaluations")) == defaults.space.max_full_evaluations
    assert page.locator("#auto-optimize [name=float_fallback]").is_checked() is defaults.space.float_fallback
    assert page.locator("#auto-optimize [name=sensitivity]").is_checked() is defaults.space.sensitivity
    assert _form_value(page, "prune_method") == defaults.space.prune_method
    assert [float(r) for r in _form_value(page, "prune_ratios").split(",")] == list(space.prune_ratios)
    assert _form_value(page, "graph_optimization") == defaults.space.graph_optimization.model_type
    checked = page.eval_on_selector_all(
        "#auto-optimize input[name=precisions]:checked", "boxes => boxes.map(b => b.value)"
    )
    assert sorted(checked) == sorted(space.precisions)
    calibrations = page.eval_on_selector_all(
        "#auto-optimize input[name=calibrations]", "boxes => boxes.map(b => [b.value, b.checked])"
    )
    assert {name for name, on in calibrations if on} == set(space.calibrations)

    # the budget reads in points (or percent when relative), with the fraction the API gets
    page.fill("#auto-optimize [name=max_drop]", "2")
    assert "at most 2 points of top-1" in page.inner_text("#max-drop-reading")
    assert "max_drop 0.0200" in page.inner_text("#max-drop-reading")
    page.check("#auto-optimize [name=relative]")
    assert "%" in page.inner_text("#max-drop-unit") and "2 % of the original" in page.inner_text(
        "#max-drop-reading"
    )
    # a drop no one means (over 50 points) is refused in the form, naming the field
    page.fill("#auto-optimize [name=max_drop]", "100")
    page.click("#auto-optimize button[type=submit]")
    assert "Max drop" in page.inner_text("#auto-error")
    page.click("#auto-optimize button[type=reset]")
    assert float(_form_value(page, "max_drop")) == pytest.approx(1.0)
    page.wait_for_selector("#auto-error", state="hidden", timeout=5000)  # the reset handler runs after


def test_the_form_starts_a_search_and_its_page_shows_it_live(
    page,  # noqa: F811
    embedded_stack: LiveStack,
    digits: DigitsArtifacts,
    tmp_path,
) -> None:
    with embedded_stack.client() as client:
        model = upload(client, digits.onnx_path, "models", "digits-auto")
        evaluation = upload(
            client, unique_dataset(digits, tmp_path, samples=200), "datasets", "digits-eval-auto"
        )
        calibration = upload(client, digits.calib_npz, "datasets", "digits-calib-auto")
    page.goto(f"{embedded_stack.base_url}/ui")
    option = f"#auto-optimize select[name=evaluation_dataset_id] option[value={evaluation['id']}]"
    page.wait_for_selector(option, state="attached")
    form = page.locator("#auto-optimize")
    form.locator("select[name=model_id]").select_option(model["id"])
    form.locator("select[name=evaluation_dataset_id]").select_option(evaluation["id"])
    form.locator("select[name=calibration_dataset_id]").select_option(calibration["id"])
    form.locator("select[name=backends]").select_option(["onnxruntime-cpu"])
    for box in form.locator("input[name=precisions]").all():
        box.set_checked(box.get_attribute("value") in ("fp32", "int8"))
    for box in form.locator("input[name=calibrations]").all():
        box.set_checked(box.get_attribute("value") == "minmax")
    form.locator("[name=max_drop]").fill("1.5")
    form.locator("[name=time_budget_minutes]").fill("1")
    form.locator("[name=prune_ratios]").fill("")
    form.locator("[name=qat_epochs]").fill("0")
    form.locator("button[type=submit]").click()

    page.wait_for_url("**/ui/jobs/job_*")
    job_id = page.url.rsplit("/", 1)[-1]
    with httpx.Client(base_url=embedded_stack.base_url, timeout=30) as client:
        recipe = client.get(f"/v1/jobs/{job_id}").json()["recipe"]
    assert recipe["budget"]["max_drop"] == pytest.approx(0.015)  # 1.5 points, sent as the fraction
    assert recipe["time_budget_s"] == pytest.approx(60)
    assert sorted(recipe["space"]["precisions"]) == ["fp32", "int8"]
    assert recipe["space"]["calibrations"] == ["minmax"] and recipe["space"]["prune_ratios"] == []
    page.wait_for_selector("#job-kind:text-is('auto-optimize')")  # kind_label, not "autotune"

    # live: while the search runs, its elapsed time and the time it has left
    page.wait_for_selector("#job-status.running", timeout=120_000)
    page.wait_for_selector("#job-facts dt:has-text('Time left')", timeout=10_000)
    assert "Elapsed" in page.inner_text("#job-facts")
    assert "Time budget" in page.inner_text("#job-facts") and "1 min 00 s" in page.inner_text("#job-facts")
    _screenshot(page, "console-autotune-running.png")

    page.wait_for_selector("#job-status.succeeded", timeout=300_000)
    page.wait_for_selector("#autotune-candidates tbody tr >> nth=1", timeout=30_000)
    facts = page.inner_text("#job-facts")
    # the names the records have (an upload deduplicated against an earlier test's keeps that name)
    assert all(record["name"] in facts for record in (model, evaluation, calibration)), facts
    # one outcome, said once: a chosen engine, or the original served, never both
    text = page.inner_text("main")
    assert ("Chosen:" in text) != ("No candidate beats the original" in text), text
    # lineage in every table: the report's rows and the candidates
    lineages = page.eval_on_selector_all("#report td.lineage", "cells => cells.map(c => c.textContent)")
    assert all(cell.strip() for cell in lineages) and any(
        "int8" in cell or "fp32" in cell for cell in lineages
    )
    assert "minmax" in page.inner_text("#autotune-candidates")
    # one unit: speedup, ×
    assert "×" in page.inner_text("#autotune-candidates") and "cost" not in page.inner_text("#job-stage")
    for figure in ("#plot", "#autotune-plot"):
        markers = page.evaluate(OVERLAPPING_MARKERS, figure)
        assert markers["count"] >= 2 and markers["pairs"] == [], (figure, markers)
    assert page.locator("#plot svg.plot rect.original").count() == 1
    _screenshot(page, "console-autotune-done.png")
    assert page.console_errors == []  # type: ignore[attr-defined]
    with httpx.Client(base_url=embedded_stack.base_url, timeout=30) as client:
        assert wait_for_job(client, job_id)["status"] == "succeeded"


def test_plot_markers_never_cover_each_other(page, embedded_stack: LiveStack) -> None:  # noqa: F811
    """Coinciding points (the chosen engine on the original, a cluster of equal candidates): each
    marker moved aside with a leader line to its true place, none hidden, the original and the
    chosen one both in sight; at a phone's width as on a desktop."""
    page.goto(f"{embedded_stack.base_url}/ui/jobs")
    page.wait_for_selector("#who:has-text('no API key needed')")
    for width in (340, 720):
        page.evaluate(
            """(width) => {
              const kinds = ["original", "chosen", ...Array(12).fill("accepted"), "front", "rejected"];
              const points = kinds.map((kind, index) => ({
                x: index < 14 ? 1 : 1.5, y: index < 14 ? 0 : 0.4, kind,
                key: kind === "original" ? "O" : String(index), title: kind, cells: [kind],
              }));
              const figure = document.createElement("figure");
              figure.id = "test-plot";
              figure.replaceChildren(scatterPlot(points, {
                width, xFormat: (x, d) => x.toFixed(d), yFormat: (y, d) => y.toFixed(d),
                xLabel: "x", yLabel: "y", ariaLabel: "test", columns: ["kind"],
                hline: { y: 1, label: "budget" },
              }));
              document.querySelector("#test-plot")?.remove();
              document.querySelector("main").append(figure);
            }""",
            width,
        )
        markers = page.evaluate(OVERLAPPING_MARKERS, "#test-plot")
        assert markers["count"] == 16 and markers["pairs"] == [], (width, markers)
        assert page.locator("#test-plot .leaders line.leader").count() >= 13  # all but the first at a spot
        assert page.locator("#test-plot svg.plot .point.original").count() == 1
        assert page.locator("#test-plot svg.plot .point.chosen").count() == 1
        assert page.locator("#test-plot table.legend tbody tr").count() == 16
