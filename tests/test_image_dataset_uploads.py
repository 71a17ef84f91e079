"""Image-folder datasets over the API: a .zip of PNGs in class folders becomes a dataset that fits
the digits CNN, is shown with its preprocessing spec, and scores the model as its .npz twin does;
refusals leave nothing stored. (The reader itself: tests/test_image_datasets.py.)"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import QUICK_MEASURE, DigitsArtifacts, LocalApi
from workers.job_runner import run_job_by_id

#: The digits arrays are pixels in [0, 1], one channel, 32×32: a spec that reads the PNGs back so.
DIGITS_SPEC = {
    "size": [32, 32],
    "resize": "none",
    "channel_order": "GRAY",
    "mean": [0.0],
    "std": [1.0],
    "layout": "NCHW",
    "dtype": "float32",
}


def _digits_zip(digits: DigitsArtifacts, path: Path, samples: int = 200, labelled: bool = True) -> Path:
    images, labels = digits.split.test_x[:samples, 0], digits.split.test_y[:samples]
    with zipfile.ZipFile(path, "w") as archive:
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            buffer = io.BytesIO()
            Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
            name = f"{label}/{index:04d}.png" if labelled else f"{index:04d}.png"
            archive.writestr(name, buffer.getvalue())
    return path


def _stored_files(api: LocalApi) -> list[Path]:
    root = api.settings.resolved_artifact_dir / "datasets"
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


def test_image_folder_dataset_scores_the_model_like_its_npz(
    local_api: LocalApi, digits: DigitsArtifacts, tmp_path: Path
) -> None:
    client = local_api.client
    archive = _digits_zip(digits, tmp_path / "digits.zip")
    with archive.open("rb") as handle:
        answer = client.post(
            "/v1/datasets",
            files={"file": ("digits.zip", handle)},
            data={"preprocessing": json.dumps(DIGITS_SPEC), "name": "digit-pngs"},
        )
    assert answer.status_code == 201, answer.text
    dataset = answer.json()
    assert dataset["samples"] == 200 and dataset["has_labels"] and dataset["classes"] == 10
    assert dataset["arrays"]["input"]["shape"] == [200, 1, 32, 32]
    folder = dataset["image_folder"]
    assert folder["class_names"] == [str(label) for label in range(10)]
    assert folder["preprocessing"]["channel_order"] == "GRAY" and folder["preprocessing"]["layout"] == "NCHW"
    assert client.get(f"/v1/datasets/{dataset['id']}").json()["image_folder"] == folder

    with digits.onnx_path.open("rb") as handle:
        model = client.post("/v1/models", files={"file": ("digits.onnx", handle)}).json()
    recipe = {"batch_sizes": [1], "measure": QUICK_MEASURE}
    job = client.post(
        "/v1/jobs", json={"model_id": model["id"], "evaluation_dataset_id": dataset["id"], "recipe": recipe}
    ).json()
    run_job_by_id(local_api.settings, job["id"])
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done
    baseline_top1 = client.get(f"/v1/jobs/{job['id']}/report").json()["rows"][0]["top1"]
    logits = digits.torch_test_logits[:200]
    expected = float((logits.argmax(axis=1) == digits.split.test_y[:200]).mean())
    assert abs(baseline_top1 - expected) <= 0.01  # 8-bit PNGs of pixels that were k/16


def test_image_folder_refusals_store_nothing(
    local_api: LocalApi, digits: DigitsArtifacts, tmp_path: Path
) -> None:
    client = local_api.client
    archive = _digits_zip(digits, tmp_path / "digits.zip", samples=12)
    bad_spec = client.post(
        "/v1/datasets",
        files={"file": ("digits.zip", archive.read_bytes())},
        data={"preprocessing": json.dumps({"mean": [123.0], "channel_order": "GRAY"})},
    )
    assert bad_spec.status_code == 422 and bad_spec.json()["code"] == "invalid_preprocessing"
    not_json = client.post(
        "/v1/datasets", files={"file": ("digits.zip", archive.read_bytes())}, data={"preprocessing": "{size"}
    )
    assert not_json.status_code == 422 and not_json.json()["code"] == "invalid_preprocessing"
    spec_on_npz = client.post(
        "/v1/datasets",
        files={"file": ("eval.npz", digits.eval_npz.read_bytes())},
        data={"preprocessing": json.dumps(DIGITS_SPEC)},
    )
    assert spec_on_npz.status_code == 422 and spec_on_npz.json()["code"] == "invalid_preprocessing"

    corrupt = tmp_path / "corrupt.zip"
    with zipfile.ZipFile(corrupt, "w") as target, zipfile.ZipFile(archive) as source:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
        target.writestr("3/broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    refused = client.post(
        "/v1/datasets",
        files={"file": ("corrupt.zip", corrupt.read_bytes())},
        data={"preprocessing": json.dumps(DIGITS_SPEC)},
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "image_decode_failed" and refused.json()["member"] == "3/broken.png"
    assert client.get("/v1/datasets").json() == []
    assert _stored_files(local_api) == []
