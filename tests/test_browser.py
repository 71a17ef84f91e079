"""The pages a person uses, in a real browser: Debian's Chromium, headless, driven by Playwright,
against a live `optiforge serve`, with every request that leaves this machine refused (so a page
that needs a CDN fails here as it would on a cluster without internet).

Skipped with the reason where Chromium or Playwright is missing; `.ci/run` installs both.
Screenshots go to `test-artifacts/` (OPTIFORGE_TEST_ARTIFACTS to put them elsewhere).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, DigitsArtifacts, LiveStack
from tests.console_records import unique_dataset, unique_model

CHROMIUM = (
    os.environ.get("OPTIFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
ARTIFACTS = Path(os.environ.get("OPTIFORGE_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, embedded_stack: LiveStack):
    """A page that may load only from the server under test: anything else is aborted and listed."""
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    page = context.new_page()
    page.outside_requests = []  # type: ignore[attr-defined]
    page.console_errors = []  # type: ignore[attr-defined]
    server = urlsplit(embedded_stack.base_url).netloc

    def only_local(route) -> None:
        if urlsplit(route.request.url).netloc in (server, ""):
            route.continue_()
        else:
            page.outside_requests.append(route.request.url)  # type: ignore[attr-defined]
            route.abort()

    page.route("**/*", only_local)
    page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))
    yield page
    context.close()


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def _wait_for(page, selector: str, timeout: float = 30_000) -> None:
    """Wait for `selector`; on a time-out, fail with what the console flashed (its error message)."""
    try:
        page.wait_for_selector(selector, timeout=timeout)
    except sync_api.TimeoutError:
        flashed = page.inner_text("#flash") if page.locator("#flash").is_visible() else "(nothing flashed)"
        pytest.fail(f"{selector} did not appear; the console said: {flashed}")


def test_swagger_ui_and_redoc_render_without_internet(page, embedded_stack: LiveStack) -> None:
    page.goto(f"{embedded_stack.base_url}/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    operations = page.locator(".opblock").count()
    assert operations > 30, operations
    assert page.locator("button.authorize").count() == 1  # the API-key schemes are declared
    _screenshot(page, "swagger.png")
    page.goto(f"{embedded_stack.base_url}/redoc")
    page.wait_for_selector("text=Upload an ONNX model", state="attached", timeout=30_000)
    # ReDoc's bundle links its "powered by" badge image from its CDN: refused here, and the page
    # renders without it. Nothing else may leave the machine.
    badge = "https://cdn.redoc.ly/redoc/logo-mini.svg"
    assert [url for url in page.outside_requests if url != badge] == []  # type: ignore[attr-defined]


def test_console_upload_job_report_and_try_it(
    page, embedded_stack: LiveStack, digits: DigitsArtifacts, tmp_path: Path
) -> None:
    base = f"{embedded_stack.base_url}/ui"
    page.goto(base)
    page.wait_for_selector("#who:has-text('no API key needed')")

    # files of their own: uploads are deduplicated by content, and the digits files other tests
    # uploaded would come back under those tests' names
    page.set_input_files("#upload-model input[type=file]", str(unique_model(digits, tmp_path)))
    page.fill("#upload-model input[name=name]", "digits-browser")
    page.click("#upload-model button")
    _wait_for(page, "#models td:has-text('digits-browser')")
    evaluation, calibration = unique_dataset(digits, tmp_path, 200), unique_dataset(digits, tmp_path, 128)
    for path, name in ((evaluation, "digits-eval-browser"), (calibration, "digits-calib-browser")):
        page.set_input_files("#upload-dataset input[type=file]", str(path))
        page.fill("#upload-dataset input[name=name]", name)
        page.click("#upload-dataset button")
        _wait_for(page, f"#datasets td:has-text('{name}')")

    form = page.locator("#start-job")
    form.locator("select[name=model_id]").select_option(
        label=page.locator(
            "#start-job select[name=model_id] option", has_text="digits-browser"
        ).first.inner_text()
    )
    form.locator("select[name=evaluation_dataset_id]").select_option(
        label=page.locator(
            "#start-job select[name=evaluation_dataset_id] option", has_text="digits-eval-browser"
        ).first.inner_text()
    )
    form.locator("select[name=precision]").select_option("fp32")
    form.locator("input[name=batch_sizes]").fill("1")
    form.locator("button").click()

    page.wait_for_url("**/ui/jobs/job_*")
    page.wait_for_selector("#job-status.succeeded", timeout=240_000)
    page.wait_for_selector("#report tbody tr >> nth=1")  # the original and the engine
    assert page.locator("#report tr.original").count() == 1
    assert page.locator("#plot svg.plot rect.original").count() == 1  # the original, marked
    assert page.locator("#plot svg.plot circle.marker").count() >= 1
    report = _screenshot(page, "console-report.png")
    assert report.stat().st_size > 10_000

    page.locator("#job-engines a").first.click()
    page.wait_for_selector("#engine-latency tbody tr")
    sample = tmp_path / "sample.npy"
    np.save(sample, digits.split.test_x[:2].astype(np.float32))
    page.set_input_files("#try-form input[type=file]", str(sample))
    page.click("#try-form button")
    page.wait_for_selector("#try-result:has-text('logits')")
    answer = json.loads(page.inner_text("#try-result"))
    assert answer["outputs"][0]["name"] == "logits" and answer["outputs"][0]["shape"] == [2, 10]
    page.fill("#alias-form input[name=alias]", "digits-browser")
    page.click("#alias-form button[type=submit]")
    page.wait_for_selector("#engine-facts dd:has-text('digits-browser')")
    _screenshot(page, "console-engine.png")
    assert page.outside_requests == []  # type: ignore[attr-defined]
    assert page.console_errors == []  # type: ignore[attr-defined]
