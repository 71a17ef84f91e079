"""Every console page at 390 px wide (a phone), in Chromium against a live `optiforge serve`: the page
is never wider than the screen (tables scroll inside their cards), the jobs list keeps its status
column in view, and the plots' text stays readable (at least 10 px as drawn)."""

from __future__ import annotations

import pytest

from tests.conftest import LiveStack
from tests.console_records import ConsoleRecords, console_records  # noqa: F401 - a fixture
from tests.test_browser import CHROMIUM, _screenshot, _wait_for, browser, page  # noqa: F401 - fixtures
from tests.test_browser_csp import COLLECT_VIOLATIONS, _violations

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)"
)

PHONE = {"width": 390, "height": 844}

#: The smallest text of the page's plots, in CSS pixels as drawn (the SVG's scale included).
SMALLEST_PLOT_TEXT = """
() => Math.min(...[...document.querySelectorAll("svg.plot text")].map((text) => {
  const svg = text.ownerSVGElement;
  const scale = svg.getBoundingClientRect().width / svg.viewBox.baseVal.width;
  return parseFloat(getComputedStyle(text).fontSize) * scale;
}))
"""


def _pages(records: ConsoleRecords) -> dict[str, str]:
    fp32_engine, int8_engine = records.fp32_job["engine_ids"][0], records.int8_job["engine_ids"][0]
    return {
        "overview": ("", "#models tbody tr"),
        "jobs": ("/jobs", "#jobs tbody tr"),
        "job-autotune": (f"/jobs/{records.autotune_job['id']}", "#autotune-candidates tbody tr"),
        "job-int8": (f"/jobs/{records.int8_job['id']}", "#report tbody tr"),
        "engine-int8": (f"/engines/{int8_engine}", "#engine-latency tbody tr"),
        "compare-jobs": (
            f"/compare?jobs={records.fp32_job['id']},{records.int8_job['id']}",
            "#compare tbody tr",
        ),
        "compare-engines": (f"/compare?engines={fp32_engine},{int8_engine}", "#compare tbody tr"),
    }


def test_every_page_fits_a_390px_screen(
    page,  # noqa: F811
    embedded_stack: LiveStack,
    console_records: ConsoleRecords,  # noqa: F811
) -> None:
    page.set_viewport_size(PHONE)
    page.add_init_script(COLLECT_VIOLATIONS)  # and every page keeps its Content-Security-Policy
    base = f"{embedded_stack.base_url}/ui"
    for name, (path, ready) in _pages(console_records).items():
        page.goto(base + path)
        _wait_for(page, ready)
        page.wait_for_timeout(300)  # the last of the page's requests
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], (name, width)
        if page.locator("svg.plot").count():
            assert page.evaluate(SMALLEST_PLOT_TEXT) >= 10, name
        assert _violations(page) == [], name
        _screenshot(page, f"console-390-{name}.png")

    page.goto(f"{base}/jobs")
    _wait_for(page, "#jobs tbody tr")
    status_head = page.locator("#jobs th", has_text="Status")
    status_cell = page.locator("#jobs tbody tr td .badge").first
    for locator in (status_head, status_cell):
        box = locator.bounding_box()
        assert locator.is_visible() and box is not None and box["x"] + box["width"] <= PHONE["width"], box
    assert page.console_errors == []  # type: ignore[attr-defined]
