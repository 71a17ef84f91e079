"""The jobs list and a job's page in Chromium against a live `optiforge serve`: filters by status,
kind and model (the API's), the precision and best-speedup columns, kinds as people name them
("recipe", "auto-optimize"), two jobs side by side; a job's model, datasets, recipe and timing."""

from __future__ import annotations

import pytest

from tests.conftest import LiveStack
from tests.console_records import ConsoleRecords, console_records  # noqa: F401 - a fixture
from tests.test_browser import CHROMIUM, _screenshot, _wait_for, browser, page  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)"
)


def _row(page, job_id: str):  # noqa: F811 - the fixture's value
    return page.locator("#jobs tbody tr", has_text=job_id)


def test_jobs_list_filters_columns_and_compare(
    page,  # noqa: F811
    embedded_stack: LiveStack,
    console_records: ConsoleRecords,  # noqa: F811
) -> None:
    records = console_records
    page.goto(f"{embedded_stack.base_url}/ui/jobs")
    _wait_for(page, f"#jobs td:has-text('{records.autotune_job['id']}')")
    headings = page.eval_on_selector_all("#jobs thead th", "cells => cells.map(c => c.textContent)")
    assert {"Status", "Kind", "Model", "Precision", "Best speedup"} <= set(headings)
    int8 = _row(page, records.int8_job["id"])
    assert (
        "recipe" in int8.inner_text()
        and "int8" in int8.inner_text()
        and records.model_name in int8.inner_text()
    )
    assert "×" in int8.inner_text()  # its best speedup
    assert "auto-optimize" in _row(page, records.autotune_job["id"]).inner_text()

    page.select_option("#job-filters select[name=kind]", "autotune")
    page.wait_for_function(
        "id => ![...document.querySelectorAll('#jobs tbody tr')].some(r => r.textContent.includes(id))",
        arg=records.int8_job["id"],
    )
    assert _row(page, records.autotune_job["id"]).count() == 1
    assert "kind=autotune" in page.url  # a filter is a link
    page.select_option("#job-filters select[name=kind]", "")
    page.select_option("#job-filters select[name=status]", "failed")
    page.wait_for_function(
        "id => ![...document.querySelectorAll('#jobs tbody tr')].some(r => r.textContent.includes(id))",
        arg=records.autotune_job["id"],
    )
    page.select_option("#job-filters select[name=status]", "")
    page.select_option("#job-filters select[name=model_id]", records.model_id)
    _wait_for(page, f"#jobs td:has-text('{records.fp32_job['id']}')")

    assert page.locator("#jobs-compare").is_disabled()
    _row(page, records.fp32_job["id"]).locator("input.pick").check()
    _row(page, records.int8_job["id"]).locator("input.pick").check()
    page.click("#jobs-compare")
    page.wait_for_url("**/ui/compare?jobs=*")
    _wait_for(page, "#compare tbody tr")
    precision = page.locator("#compare tr", has_text="recipe.precision")
    assert "fp32" in precision.inner_text() and "int8" in precision.inner_text()
    assert "differs" in (precision.get_attribute("class") or "")
    assert page.evaluate("document.documentElement.scrollWidth") <= page.viewport_size["width"]


def test_a_job_page_names_its_model_datasets_recipe_and_timing(
    page,  # noqa: F811
    embedded_stack: LiveStack,
    console_records: ConsoleRecords,  # noqa: F811
) -> None:
    records = console_records
    job = records.int8_job
    page.goto(f"{embedded_stack.base_url}/ui/jobs/{job['id']}")
    _wait_for(page, "#report tbody tr >> nth=1")
    facts = page.inner_text("#job-facts")
    names = (records.model_name, records.evaluation_name, records.calibration_name)
    for expected in (*names, "Elapsed", "Finished"):
        assert expected in facts, (expected, facts)
    assert '"precision": "int8"' in page.locator("#job-recipe").text_content()
    assert page.inner_text("#job-kind") == "recipe"
    lineage = page.locator("#report tbody tr >> nth=1").locator("td.lineage").inner_text()
    assert "int8" in lineage and "minmax" in lineage
    assert page.locator("#job-best").is_visible() and "×" in page.inner_text("#job-best")
    _screenshot(page, "console-job-int8.png")
