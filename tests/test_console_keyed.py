"""The console on a server with an API key, in Chromium: what goes through the page's own requests
(download, delete, the auto-optimize form's job) carries the key the person typed; a plain link
would not (a browser sends no `Authorization` header with it) and would get a 401."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import DigitsArtifacts, LiveStack, start_stack
from tests.console_records import quick_recipe, run_job, upload
from tests.test_browser import CHROMIUM, browser  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)"
)

KEY = "ui23-console-key-" + "k" * 32


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    with start_stack("embedded", tmp_path_factory.mktemp("keyed"), OPTIFORGE_BOOTSTRAP_API_KEY=KEY) as stack:
        yield stack


def test_download_and_delete_carry_the_typed_key(
    browser,  # noqa: F811
    keyed_stack: LiveStack,
    digits: DigitsArtifacts,
) -> None:
    with httpx.Client(
        base_url=keyed_stack.base_url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}
    ) as client:
        model = upload(client, digits.onnx_path, "models", "digits-keyed")
        dataset = upload(client, digits.eval_npz, "datasets", "eval-keyed")
        job = run_job(
            client,
            {"model_id": model["id"], "evaluation_dataset_id": dataset["id"], "recipe": quick_recipe("fp32")},
        )
    engine_id = job["engine_ids"][0]
    assert httpx.get(f"{keyed_stack.base_url}/v1/engines/{engine_id}/download").status_code == 401

    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    try:
        page = context.new_page()
        page.goto(f"{keyed_stack.base_url}/ui/engines/{engine_id}")
        page.wait_for_selector("#key-input:visible")  # asked for a key, nothing shown without one
        page.fill("#key-input", KEY)
        page.click("#key-save")
        page.wait_for_selector("#engine-facts dd:has-text('digits-keyed')")
        with page.expect_download() as downloading:
            page.click("#engine-download")
        saved = Path(downloading.value.path())
        assert saved.stat().st_size > 10_000 and engine_id in downloading.value.suggested_filename
        page.click("#engine-delete")
        page.click("#confirm-delete")
        page.wait_for_url(f"**/ui/jobs/{job['id']}")
    finally:
        context.close()
    with httpx.Client(base_url=keyed_stack.base_url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        assert client.get(f"/v1/engines/{engine_id}").status_code == 404
