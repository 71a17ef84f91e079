"""Issue 19 item 12, last part: a batch axis stated at upload is the one every layer uses.

The graph of a time-major sequence model (`x` ["T", "N", 4], both dynamic) says its batch is dim 0;
the user states dim 1. Datasets, job validation, the engines' build and measurement, the engine
records and serving (/v1 and /v2) must all stack samples along dim 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from optiforge_client import tensors

from engines.backends.registry import unavailable_reason
from engines.ingest.signature import TensorSpec, assign_batch_axes, decide_batch_axes
from tests import quirk_graphs
from tests.conftest import LiveStack, LocalApi, wait_for_job
from tests.test_real_world_quirks import QUICK, _job, _npz, _upload

T, FEATURES = 5, 4
#: Every CPU backend this node runs builds, measures and serves along the stated axis.
CPU_TARGETS = ("onnxruntime-cpu", "openvino-cpu", "torch-cpu")


def _expected(x: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs in numpy, for x [T, N, 4]: (logits [N, 3], frames [T, N, 3])."""
    import onnx
    from onnx import numpy_helper

    weight = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    frames = x @ weight
    return frames.mean(axis=0), frames


def test_stated_axis_wins_over_the_graph_and_outputs_follow_it() -> None:
    """One rule: the stated axis if any, else the graph's; outputs follow the stated batch's name."""
    graph_inputs = [TensorSpec("x", "float32", ("T", "N", 4))]
    graph_outputs = [
        TensorSpec("logits", "float32", ("N", 3)),
        TensorSpec("frames", "float32", ("T", "N", 3)),
    ]
    assert [spec.batch_axis for spec in assign_batch_axes(graph_inputs)] == [0]  # the graph's guess
    inputs, outputs = decide_batch_axes(graph_inputs, graph_outputs, {"x": 1})
    assert [(spec.batch_axis, spec.batch_axis_stated) for spec in inputs] == [(1, True)]
    assert [spec.batch_axis for spec in outputs] == [0, 1]
    inputs, outputs = decide_batch_axes(graph_inputs, graph_outputs, {})
    assert [spec.batch_axis for spec in inputs] == [0] and [spec.batch_axis for spec in outputs] == [0, 0]


def test_stated_batch_axis_through_build_measurement_and_serving(local_api: LocalApi, tmp_path: Path) -> None:
    api = local_api
    path = quirk_graphs.time_major_sequence(tmp_path / "gru.onnx")
    with path.open("rb") as handle:
        response = api.client.post(
            "/v1/models", files={"file": (path.name, handle)}, data={"batch_axis": json.dumps({"x": 1})}
        )
    assert response.status_code == 201, response.text
    model = response.json()
    assert [(spec["batch_axis"], spec.get("batch_axis_stated")) for spec in model["inputs"]] == [(1, True)]
    assert [spec["batch_axis"] for spec in model["outputs"]] == [0, 1]  # outputs follow the stated "N"

    # the user's data: one row per sample, shaped [T, 4] (the input without its batch axis)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((12, T, FEATURES)).astype(np.float32)
    logits, _frames = _expected(np.moveaxis(rows, 0, 1), path)
    labels = logits.argmax(axis=1).astype(np.int64)
    dataset = _upload(api.client, "datasets", _npz(tmp_path / "rows.npz", x=rows, labels=labels))
    targets = [name for name in CPU_TARGETS if unavailable_reason(name) is None]
    job = _job(
        api,
        {
            "model_id": model["id"],
            "evaluation_dataset_id": dataset["id"],
            "recipe": {"precision": "fp32", "targets": targets, "batch_sizes": [1, 4], "measure": QUICK},
        },
    )
    assert job["status"] == "succeeded", job
    engines = [api.client.get(f"/v1/engines/{engine_id}").json() for engine_id in job["engine_ids"]]
    assert sorted(engine["backend"] for engine in engines) == sorted(targets), engines
    x = np.ascontiguousarray(np.moveaxis(rows[:3], 0, 1))  # 3 sequences stacked along dim 1: [T, 3, 4]
    want_logits, want_frames = _expected(x, path)
    for engine in engines:
        assert engine["build_info"]["batch_axes"] == {"x": 1}, engine["build_info"]
        metrics = engine["metrics"]
        assert sorted(metrics["latency"]) == ["1", "4"], metrics
        assert all(stats["batch_size"] == int(size) for size, stats in metrics["latency"].items())
        assert metrics["accuracy"]["top1"] == 1.0, metrics["accuracy"]  # labels: the original's argmax
        assert metrics["accuracy"]["fidelity"]["cosine_similarity"] > 0.9999, metrics["accuracy"]

        # serving along dim 1, on /v2 (binary) and /v1 (JSON)
        body, length = tensors.encode({"inputs": []}, "inputs", {"x": x}, binary=True)
        v2 = api.client.post(
            f"/v2/models/{engine['id']}/infer", content=body, headers={tensors.HEADER_LENGTH: str(length)}
        )
        assert v2.status_code == 200, (engine["backend"], v2.text)
        assert v2.json()["parameters"]["batch_size"] == 3
        shapes = {output["name"]: output["shape"] for output in v2.json()["outputs"]}
        assert shapes == {"logits": [3, 3], "frames": [T, 3, 3]}
        v1 = api.client.post(f"/v1/engines/{engine['id']}/infer", json={"inputs": {"x": x.tolist()}})
        assert v1.status_code == 200 and v1.json()["batch_size"] == 3, (engine["backend"], v1.text)
        outputs = {name: np.asarray(value) for name, value in v1.json()["outputs"].items()}
        np.testing.assert_allclose(outputs["logits"], want_logits, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(outputs["frames"], want_frames, rtol=1e-4, atol=1e-5)


def test_autotune_goes_by_the_stated_axis(tmp_path: Path) -> None:
    """The search measures the original and builds its candidates along the stated axis too."""
    from engines.ingest.datasets import load_dataset
    from engines.ingest.model import inspect_model
    from engines.search.autotune import AutotuneRequest, autotune
    from engines.search.space import Budget, Objective, SearchSpace

    path = quirk_graphs.time_major_sequence(tmp_path / "gru.onnx")
    inputs = list(inspect_model(path).with_stated_batch_axes('{"x": 1}').inputs)
    rows = np.random.default_rng(0).standard_normal((8, T, FEATURES)).astype(np.float32)
    labels = _expected(np.moveaxis(rows, 0, 1), path)[0].argmax(axis=1).astype(np.int64)
    data = load_dataset(
        _npz(tmp_path / "rows.npz", x=rows, labels=labels), inputs, max_unpacked_bytes=1 << 20
    )
    space = SearchSpace(
        backends=("onnxruntime-cpu",),
        precisions=("fp32",),
        calibrations=(),
        prune_ratios=(),
        float_fallback=False,
    )
    request = AutotuneRequest(Objective("latency", 4), Budget("top1", 0.0), 60.0, space)
    result = autotune(path, request, tmp_path / "search", evaluation=data, model_inputs=inputs)
    assert result.chosen is not None, result.messages
    assert result.baseline.accuracy is not None and result.baseline.accuracy["top1"] == 1.0, result.baseline
    assert result.engines[0].artifact.metadata["batch_axes"] == {"x": 1}


def test_stated_batch_axis_on_both_stacks(live_stack: LiveStack, tmp_path: Path) -> None:
    """SQLite + embedded broker and PostgreSQL + Redis with a real worker: the statement reaches the
    worker's build (the engine's build_info keeps it) and the serving replica batches along it."""
    path = quirk_graphs.time_major_sequence(tmp_path / "gru.onnx")
    rows = np.random.default_rng(0).standard_normal((6, T, FEATURES)).astype(np.float32)
    np.savez(tmp_path / "rows.npz", x=rows)
    with live_stack.client() as client:
        with path.open("rb") as handle:
            model = client.post(
                "/v1/models", files={"file": (path.name, handle)}, data={"batch_axis": '{"x": 1}'}
            )
        assert model.status_code == 201, model.text
        with (tmp_path / "rows.npz").open("rb") as handle:
            dataset = client.post("/v1/datasets", files={"file": ("rows.npz", handle)})
        assert dataset.status_code == 201, dataset.text
        body = {
            "model_id": model.json()["id"],
            "evaluation_dataset_id": dataset.json()["id"],
            "recipe": {"batch_sizes": [1, 2], "measure": QUICK},
        }
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job = wait_for_job(client, created.json()["id"])
        assert job["status"] == "succeeded", job
        engine = client.get(f"/v1/engines/{job['engine_ids'][0]}").json()
        assert engine["build_info"]["batch_axes"] == {"x": 1}, engine["build_info"]
        assert engine["metrics"]["accuracy"]["fidelity"]["cosine_similarity"] > 0.9999, engine["metrics"]
        x = np.ascontiguousarray(np.moveaxis(rows[:2], 0, 1))  # [T, 2, 4]
        encoded, length = tensors.encode({"inputs": []}, "inputs", {"x": x}, binary=True)
        v2 = client.post(
            f"/v2/models/{engine['id']}/infer", content=encoded, headers={tensors.HEADER_LENGTH: str(length)}
        )
        assert v2.status_code == 200 and v2.json()["parameters"]["batch_size"] == 2, v2.text
