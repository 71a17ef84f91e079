"""The console and the API documentation under their Content-Security-Policy, in a real browser
(Debian's Chromium, headless, via Playwright; skipped where either is missing, as in
tests/test_browser.py): every page still works, and the browser reports no CSP violation.

Violations are read twice: the `securitypolicyviolation` events a script installed before the
page's own (Playwright's init scripts are not subject to the page's CSP) collects, and Chromium's
console errors ("Refused to …").
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import DigitsArtifacts, LiveStack, wait_for_job
from tests.console_records import unique_model
from tests.test_browser import CHROMIUM, _screenshot, _wait_for, browser, page  # noqa: F401 - fixtures

# test_browser.py's own skip does not reach the tests that import its fixtures
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)"
)

COLLECT_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.violatedDirective} blocked ${event.blockedURI || "inline"} `
    + `at ${event.sourceFile}:${event.lineNumber}`);
});
"""


def _violations(page) -> list[str]:  # noqa: F811 - the fixture's value
    reported = page.evaluate("window.__cspViolations")
    refused = [text for text in page.console_errors if "Content Security Policy" in text]
    return [*reported, *refused]


def _finished_job(stack: LiveStack, digits: DigitsArtifacts, folder: Path) -> dict:
    # bytes of its own: uploads are deduplicated by content, and the same file would come back as
    # another test's record under that test's name
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        with unique_model(digits, folder).open("rb") as handle:
            model = client.post(
                "/v1/models", files={"file": ("csp.onnx", handle)}, data={"name": "csp|<b>x</b>"}
            )
        assert model.status_code == 201, model.text
        with digits.eval_npz.open("rb") as handle:
            dataset = client.post("/v1/datasets", files={"file": ("csp.npz", handle)})
        assert dataset.status_code in (200, 201), dataset.text  # 200: deduplicated
        body = {
            "model_id": model.json()["id"],
            "evaluation_dataset_id": dataset.json()["id"],
            "recipe": {
                "precision": "fp32",
                "batch_sizes": [1],
                "measure": {"warmup_runs": 1, "timed_runs": 3},
            },
        }
        job = client.post("/v1/jobs", json=body)
        assert job.status_code == 202, job.text
        finished = wait_for_job(client, job.json()["id"], timeout=240)
        assert finished["status"] == "succeeded", finished
        table = client.get(f"/v1/jobs/{finished['id']}/report", params={"format": "md"}).text
        assert "| csp\\|&lt;b&gt;x&lt;/b&gt; |" in table, table  # the model's name, escaped
        return finished


def test_console_works_under_its_csp(
    page,  # noqa: F811 - the fixture
    embedded_stack: LiveStack,
    digits: DigitsArtifacts,
    tmp_path: Path,
) -> None:
    job = _finished_job(embedded_stack, digits, tmp_path)
    page.add_init_script(COLLECT_VIOLATIONS)
    base = f"{embedded_stack.base_url}/ui"

    response = page.goto(base)
    assert "script-src 'self'" in response.headers["content-security-policy"]
    _wait_for(page, "#models td:has-text('csp|<b>x</b>')")  # shown as text, not markup
    assert page.locator("#models b").count() == 0

    page.goto(f"{base}/jobs")
    _wait_for(page, f"#jobs td:has-text('{job['id']}')")
    bar = page.locator("#jobs .progress div").first
    assert bar.evaluate("node => node.style.width") == "100%"  # set through CSSOM, allowed

    page.goto(f"{base}/jobs/{job['id']}")
    page.wait_for_selector("#job-status.succeeded", timeout=60_000)
    page.wait_for_selector("#report tbody tr >> nth=1")
    assert page.locator("#plot svg.plot circle.marker").count() >= 1
    page.locator("#job-engines a").first.click()
    page.wait_for_selector("#engine-latency tbody tr")
    _screenshot(page, "console-csp-engine.png")

    assert _violations(page) == []
    assert page.outside_requests == []  # type: ignore[attr-defined]


def test_swagger_ui_works_under_the_docs_csp(page, embedded_stack: LiveStack) -> None:  # noqa: F811
    page.add_init_script(COLLECT_VIOLATIONS)
    response = page.goto(f"{embedded_stack.base_url}/docs")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    page.wait_for_selector(".opblock", timeout=30_000)
    assert page.locator(".opblock").count() > 30
    page.locator(".opblock-summary").first.click()  # expands: Swagger UI's own scripts run
    assert _violations(page) == []
    page.goto(f"{embedded_stack.base_url}/redoc")
    page.wait_for_selector("text=Upload an ONNX model", state="attached", timeout=30_000)
    # ReDoc links its badge from its CDN (refused by the test's router before CSP is asked).
    assert [v for v in _violations(page) if "cdn.redoc.ly" not in v] == []


@pytest.mark.parametrize("path", ["/ui", "/docs"])
def test_pages_cannot_be_framed(page, embedded_stack: LiveStack, path: str) -> None:  # noqa: F811
    """A page of another origin that frames the console gets an empty frame."""
    server = urlsplit(embedded_stack.base_url)
    framing = f"http://localhost:{server.port}/ui/static/none.html"  # another origin: localhost vs 127.0.0.1
    page.route(
        framing,
        lambda route: route.fulfill(
            content_type="text/html", body=f'<iframe id="f" src="{embedded_stack.base_url}{path}"></iframe>'
        ),
    )
    page.goto(framing)
    page.wait_for_timeout(1500)
    # Blocked, the frame holds Chromium's error page: nothing of ours (the console's header, Swagger UI).
    frame = page.frame_locator("#f")
    assert frame.locator("a.brand, #swagger-ui").count() == 0
    (child,) = [frame for frame in page.frames if frame is not page.main_frame]
    assert child.url.startswith("chrome-error://"), child.url
