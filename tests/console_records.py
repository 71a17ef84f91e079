"""What the console's browser tests look at, made once per session through the public API on the
shared embedded stack: the digits model and its datasets, an fp32 job, an INT8 job (with its
per-layer report) and a small auto-optimize search. Import the fixture into a test module
(`from tests.console_records import console_records  # noqa: F401`) as test_browser_csp imports
test_browser's; `unique_model` and `unique_dataset` make records that no other test shares (uploads
are deduplicated by content, so the same bytes would come back as the shared record).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import QUICK_MEASURE, DigitsArtifacts, LiveStack, wait_for_job


@dataclass(frozen=True)
class ConsoleRecords:
    """Ids and names as the API answered: an upload deduplicated against an earlier test's record
    keeps that record's name."""

    model_id: str
    model_name: str
    evaluation_id: str
    evaluation_name: str
    calibration_id: str
    calibration_name: str
    fp32_job: dict
    int8_job: dict
    autotune_job: dict


def upload(client: httpx.Client, path: Path, kind: str, name: str | None = None) -> dict:
    """POST a file to /v1/models or /v1/datasets; a deduplicated upload (200) is as good as a new one."""
    with path.open("rb") as handle:
        response = client.post(
            f"/v1/{kind}", files={"file": (path.name, handle)}, data={"name": name} if name else {}
        )
    assert response.status_code in (200, 201), response.text
    return response.json()


def run_job(client: httpx.Client, body: dict, path: str = "/v1/jobs", timeout: float = 300) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 202, response.text
    finished = wait_for_job(client, response.json()["id"], timeout=timeout)
    assert finished["status"] == "succeeded", finished
    return finished


def quick_recipe(precision: str) -> dict:
    return {"precision": precision, "batch_sizes": [1], "measure": QUICK_MEASURE}


def unique_model(digits: DigitsArtifacts, folder: Path) -> Path:
    """The digits model with a doc string of its own: other bytes, so a record of its own."""
    import onnx

    model = onnx.load(str(digits.onnx_path))
    model.doc_string = f"console test {secrets.token_hex(4)}"
    path = folder / f"digits-{secrets.token_hex(3)}.onnx"
    onnx.save(model, str(path))
    return path


def unique_dataset(digits: DigitsArtifacts, folder: Path, samples: int = 64) -> Path:
    """A few digits test samples in a random order: a dataset no other test uploads."""
    order = np.random.default_rng(secrets.randbits(32)).permutation(len(digits.split.test_x))[:samples]
    path = folder / f"digits-{secrets.token_hex(3)}.npz"
    np.savez(path, input=digits.split.test_x[order], labels=digits.split.test_y[order])
    return path


@pytest.fixture(scope="session")
def console_records(embedded_stack: LiveStack, digits: DigitsArtifacts) -> ConsoleRecords:
    with embedded_stack.client() as client:
        model = upload(client, digits.onnx_path, "models", "digits-console")
        evaluation = upload(client, digits.eval_npz, "datasets", "digits-eval-console")
        calibration = upload(client, digits.calib_npz, "datasets", "digits-calib-console")
        datasets = {"evaluation_dataset_id": evaluation["id"]}
        fp32 = run_job(client, {"model_id": model["id"], **datasets, "recipe": quick_recipe("fp32")})
        int8 = run_job(
            client,
            {
                "model_id": model["id"],
                **datasets,
                "calibration_dataset_id": calibration["id"],
                "recipe": {**quick_recipe("int8"), "accuracy_budget": {"metric": "top1", "max_drop": 0.02}},
            },
        )
        search = {
            **datasets,
            "calibration_dataset_id": calibration["id"],
            "time_budget_minutes": 1,
            "space": {
                "backends": ["onnxruntime-cpu"],
                "precisions": ["fp32", "fp16", "int8"],
                "calibrations": ["minmax"],
                "prune_ratios": [0.3],
                "finetune_epochs": 1,
                "qat_epochs": 0,
            },
        }
        autotune = run_job(client, search, f"/v1/models/{model['id']}/optimize", timeout=400)
    return ConsoleRecords(
        model["id"],
        model["name"],
        evaluation["id"],
        evaluation["name"],
        calibration["id"],
        calibration["name"],
        fp32,
        int8,
        autotune,
    )
