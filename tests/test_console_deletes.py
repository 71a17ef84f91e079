"""Deleting from the console, in Chromium against a live `optiforge serve`: every delete asks first;
a 409 shows the server's own sentence and offers "Delete anyway" (force=true) where forcing helps.
Records of their own (a model and a dataset no other test uploads), so nothing shared goes."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import DigitsArtifacts, LiveStack
from tests.console_records import quick_recipe, run_job, unique_dataset, unique_model, upload
from tests.test_browser import CHROMIUM, _screenshot, _wait_for, browser, page  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)"
)


def _engine_with_alias(client: httpx.Client, model_id: str, dataset_id: str, alias: str) -> dict:
    job = run_job(
        client, {"model_id": model_id, "evaluation_dataset_id": dataset_id, "recipe": quick_recipe("fp32")}
    )
    (engine_id,) = job["engine_ids"]
    response = client.put(f"/v1/engines/{engine_id}/alias", json={"alias": alias})
    assert response.status_code == 200, response.text
    return job


def _refused_then_forced(page, refusal_contains: str) -> None:  # noqa: F811 - the fixture's value
    """In the open confirmation: Delete, read the server's 409 sentence, then Delete anyway."""
    dialog = page.locator("#confirm-dialog")
    assert dialog.is_visible()
    page.click("#confirm-delete")
    page.wait_for_selector("#confirm-refusal:visible")
    assert refusal_contains in page.inner_text("#confirm-refusal")
    assert page.locator("#confirm-force").is_visible() and page.locator("#confirm-delete").is_hidden()
    _screenshot(page, "console-delete-refused.png")
    page.click("#confirm-force")


def test_deletes_ask_and_a_409_offers_delete_anyway(
    page,  # noqa: F811
    embedded_stack: LiveStack,
    digits: DigitsArtifacts,
    tmp_path,
) -> None:
    base = f"{embedded_stack.base_url}/ui"
    with embedded_stack.client() as client:
        model = upload(client, unique_model(digits, tmp_path), "models", "digits-to-delete")
        dataset = upload(client, unique_dataset(digits, tmp_path), "datasets", "eval-to-delete")
        first = _engine_with_alias(client, model["id"], dataset["id"], "delete-me-engine")
        second = run_job(
            client,
            {"model_id": model["id"], "evaluation_dataset_id": dataset["id"], "recipe": quick_recipe("fp32")},
        )

    # an engine that holds an alias: 409 engine_holds_alias, the alias named, then forced
    engine_id = first["engine_ids"][0]
    page.goto(f"{base}/engines/{engine_id}")
    page.wait_for_selector("#engine-facts dd:has-text('delete-me-engine')")
    page.click("#engine-delete")
    page.click("#confirm-cancel")  # cancel deletes nothing
    assert page.locator("#confirm-dialog").is_hidden()
    page.click("#engine-delete")
    _refused_then_forced(page, "delete-me-engine")
    page.wait_for_url(f"**/ui/jobs/{first['id']}")
    with embedded_stack.client() as client:
        assert client.get(f"/v1/engines/{engine_id}").status_code == 404

    # a finished job without aliases: one click and a confirmation, then the jobs list
    page.goto(f"{base}/jobs/{second['id']}")
    page.wait_for_selector("#job-status.succeeded")
    page.click("#job-delete")
    page.click("#confirm-delete")
    page.wait_for_url("**/ui/jobs")
    with embedded_stack.client() as client:
        assert client.get(f"/v1/jobs/{second['id']}").status_code == 404
        third = _engine_with_alias(client, model["id"], dataset["id"], "delete-me-model")

    # a model whose engine serves: 409 model_serving, forced from the overview's table
    page.goto(base)
    row = page.locator("#models tr", has_text=model["id"])
    row.locator("button", has_text="Delete").click()
    _refused_then_forced(page, "delete-me-model")
    page.wait_for_selector(f"#models td:has-text('{model['id']}')", state="detached")
    with embedded_stack.client() as client:
        assert client.get(f"/v1/models/{model['id']}").status_code == 404
        assert client.get(f"/v1/jobs/{third['id']}").status_code == 404

    # a dataset no job runs on: deleted at once after the confirmation
    page.locator("#datasets tr", has_text=dataset["id"]).locator("button", has_text="Delete").click()
    assert dataset["name"] in page.inner_text("#confirm-title")
    page.click("#confirm-delete")
    page.wait_for_selector(f"#datasets td:has-text('{dataset['id']}')", state="detached")
    assert page.console_errors == [] or all("409" in error for error in page.console_errors)  # type: ignore[attr-defined]
