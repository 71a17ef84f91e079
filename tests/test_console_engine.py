"""An engine's page in Chromium against a live `optiforge serve`: "Try it" shows the top-5 classes of
class-score outputs and clears what it showed when the next try fails; the per-layer INT8 table
(worst own error first, with its legend) lets a person pick layers and start the job that keeps
them in float (`quantize.nodes_to_exclude`); download and compare."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DigitsArtifacts, LiveStack, wait_for_job
from tests.console_records import ConsoleRecords, console_records  # noqa: F401 - a fixture
from tests.test_browser import CHROMIUM, _screenshot, _wait_for, browser, page  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)"
)


def test_try_it_shows_the_top5_and_clears_on_error(
    page,  # noqa: F811
    embedded_stack: LiveStack,
    console_records: ConsoleRecords,  # noqa: F811
    digits: DigitsArtifacts,
    tmp_path: Path,
) -> None:
    engine_id = console_records.fp32_job["engine_ids"][0]
    page.goto(f"{embedded_stack.base_url}/ui/engines/{engine_id}")
    page.wait_for_selector("#try-form select[name=input] option", state="attached")
    good = tmp_path / "two.npy"
    np.save(good, digits.split.test_x[:2].astype(np.float32))
    page.set_input_files("#try-form input[type=file]", str(good))
    page.click("#try-form button")
    page.wait_for_selector("#try-top table.top5")
    assert page.locator("#try-top table.top5").count() == 2  # one per sample
    first = page.locator("#try-top table.top5").first
    assert first.locator("tbody tr").count() == 5
    top_class = int(first.locator("tbody tr td").first.inner_text())
    assert top_class == int(np.argmax(digits.torch_test_logits[0]))
    assert "logits" in page.inner_text("#try-result")

    # a file that is no .npy: the error, and nothing of the previous answer
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy at all")
    page.set_input_files("#try-form input[type=file]", str(bad))
    page.click("#try-form button")
    page.wait_for_selector("#try-error:visible")
    assert "not a .npy file" in page.inner_text("#try-error")
    assert page.locator("#try-top").is_hidden() and page.locator("#try-raw-box").is_hidden()
    assert page.inner_text("#try-result") == ""

    # a good try again, then one the server refuses (wrong shape): cleared as well
    page.set_input_files("#try-form input[type=file]", str(good))
    page.click("#try-form button")
    page.wait_for_selector("#try-top table.top5")
    assert page.locator("#try-error").is_hidden()
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 3, 7, 7), np.float32))
    page.set_input_files("#try-form input[type=file]", str(wrong))
    page.click("#try-form button")
    page.wait_for_selector("#try-error:visible")
    assert page.locator("#try-top").is_hidden() and page.inner_text("#try-result") == ""
    _screenshot(page, "console-try-it-error.png")


def test_keep_layers_in_float_starts_the_budgeted_job(
    page,  # noqa: F811
    embedded_stack: LiveStack,
    console_records: ConsoleRecords,  # noqa: F811
) -> None:
    engine_id = console_records.int8_job["engine_ids"][0]
    page.goto(f"{embedded_stack.base_url}/ui/engines/{engine_id}")
    _wait_for(page, "#layer-errors tbody tr input.keep")
    legend = page.inner_text("#layer-legend")
    assert "—" in legend and "own" in legend.lower()
    own = page.eval_on_selector_all("#layer-errors tbody tr", "rows => rows.map(r => r.cells[3].textContent)")
    values = [0.0 if v == "≈ 0 %" else float(v.removesuffix(" %")) for v in own if v != "—"]
    assert values == sorted(values, reverse=True)  # worst own error first
    names = page.eval_on_selector_all(
        "#layer-errors tbody td:nth-child(2) code", "codes => codes.map(c => c.textContent)"
    )
    assert names and not any(name.startswith("onnx::") for name in names)  # node names, not output names
    assert page.locator("#keep-float").is_disabled()
    boxes = page.locator("#layer-errors input.keep")
    chosen = []
    for index in range(boxes.count()):
        value = boxes.nth(index).get_attribute("value")
        if value not in chosen:
            boxes.nth(index).check()
            chosen.append(value)
        if len(chosen) == 2:
            break
    assert page.inner_text("#keep-float-help") == "2 nodes selected"
    page.click("#keep-float")
    page.wait_for_url("**/ui/jobs/job_*")
    job_id = page.url.rsplit("/", 1)[-1]
    assert job_id != console_records.int8_job["id"]
    with embedded_stack.client() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert sorted(job["recipe"]["quantize"]["nodes_to_exclude"]) == sorted(chosen)
        assert job["recipe"]["precision"] == "int8"
        assert job["recipe"]["accuracy_budget"] == console_records.int8_job["recipe"]["accuracy_budget"]
        assert job["calibration_dataset_id"] == console_records.calibration_id
        finished = wait_for_job(client, job_id, timeout=300)
    assert finished["status"] == "succeeded", finished
    page.wait_for_selector("#job-status.succeeded", timeout=60_000)
    _screenshot(page, "console-keep-in-float.png")


def test_engine_download_and_two_engines_side_by_side(
    page,  # noqa: F811
    embedded_stack: LiveStack,
    console_records: ConsoleRecords,  # noqa: F811
) -> None:
    engine_id = console_records.int8_job["engine_ids"][0]
    page.goto(f"{embedded_stack.base_url}/ui/engines/{engine_id}")
    _wait_for(page, "#engine-facts dd")
    assert "minmax" in page.inner_text("#engine-lineage")  # where it came from
    build = page.locator("#engine-facts dt:has-text('Build time') + dd").inner_text()
    assert build.endswith(" s") and float(build.split()[0]) > 0
    with page.expect_download() as downloading:
        page.click("#engine-download")
    download = downloading.value
    assert engine_id in download.suggested_filename
    assert Path(download.path()).stat().st_size > 1000

    other = console_records.fp32_job["engine_ids"][0]
    page.goto(f"{embedded_stack.base_url}/ui/jobs/{console_records.int8_job['id']}")
    _wait_for(page, "#job-engines tbody tr")
    assert page.locator("#engines-compare").is_disabled()
    page.goto(f"{embedded_stack.base_url}/ui/engines/{engine_id}")
    page.wait_for_selector(f"#compare-form option[value={other}]", state="attached")
    page.select_option("#compare-form select[name=other]", other)
    page.click("#compare-form button")
    page.wait_for_url(f"**/ui/compare?engines={engine_id},{other}")
    _wait_for(page, "#compare tbody tr")
    precision = page.locator("#compare tr", has_text="Precision")
    assert "int8" in precision.inner_text() and "fp32" in precision.inner_text()
    assert "differs" in (precision.get_attribute("class") or "")
