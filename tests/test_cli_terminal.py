"""The CLI as people read it: in a pseudo-terminal (one progress line redrawn in place, whatever
the width; tables that fit 80 columns) and redirected to a file (plain lines, a few of them, not
one control sequence).

The first tests drive the progress line and the tables with jobs and reports made up here (no
server, seconds); the last ones run `optiforge optimize --wait` against a live server, in a
terminal and into a file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from optiforge_client.progress import LOG_INTERVAL_S, LogProgress

from tests.conftest import REPO_ROOT, DigitsArtifacts, LiveStack
from tests.terminal_screen import Screen, run_in_terminal

#: A job's life as the server reports it, long stages included (wider than a narrow terminal).
FAKE_JOB = """
import datetime, sys
from optiforge_client.models import Job
from optiforge_client.progress import following

stage = "quantize: calibrating onnxruntime-cpu int8 with the entropy method on 256 samples"
now = datetime.datetime.now()
with following(sys.stderr) as follow:
    for i in range(41):
        follow(Job(
            id="job_0123456789abcdef", status="running" if i < 40 else "succeeded",
            stage=stage * (1 + i % 3), progress=i / 40, created_at=now,
            messages=[f"candidate {k} measured" for k in range(i // 10)],
            elapsed_s=float(i), remaining_s=120.0 - i,
            best={"label": "int8 onnxruntime-cpu · pruned 30 % (l1)", "speedup": 3.09, "drop": 0.012},
        ))
print("after")
"""


def _terminal(code: str, columns: int) -> tuple[Screen, str]:
    status, output = run_in_terminal(
        [sys.executable, "-c", code], os.environ, columns=columns, cwd=str(REPO_ROOT)
    )
    assert status == 0, output
    return Screen(columns).feed(output), output


@pytest.mark.parametrize("columns", [40, 80, 200])
def test_progress_is_one_line_redrawn_in_place_at_any_width(columns: int) -> None:
    screen, output = _terminal(FAKE_JOB, columns)
    lines = screen.text()
    assert screen.wraps == 0, lines  # nothing ever ran past the last column
    assert lines[:4] == ["  · candidate 0 measured", "  · candidate 1 measured", "  · candidate 2 measured",
                         "  · candidate 3 measured"], lines  # fmt: skip
    progress = [line for line in lines if "% running" in line or "% succeeded" in line]
    assert len(progress) == 1 and "100.0% succeeded" in progress[0], lines
    assert lines[-1] == "after" and len(lines) == 6, lines
    assert all(len(line) <= columns for line in lines)
    # 41 updates, 4 messages: a line feed per message, one when the line is done, one for "after"
    assert output.count("\n") == 6, output.count("\n")
    if columns >= 80:
        assert "left" in output and "best 3.09×" in output


def test_log_progress_is_plain_and_sparse() -> None:
    """Redirected: a line when the status changes, else at most one per LOG_INTERVAL_S seconds
    however often the stage changes (a search's does with every candidate), messages once, no
    control characters; the clock is made up here, so the count is exact."""
    import datetime
    import io

    from optiforge_client.models import Job

    clock = [0.0]
    out = io.StringIO()
    follow = LogProgress(out, clock=lambda: clock[0])
    now = datetime.datetime.now()
    for tick in range(100):  # 50 s of polls every 0.5 s, 3 stages
        clock[0] = tick * 0.5
        stage = f"searching: {tick} tried" if tick >= 40 else "build"  # a new stage every poll from 20 s
        follow(Job(id="job_1", status="running", stage=stage, progress=tick / 100, created_at=now,
                   messages=["built"] if tick >= 40 else []))  # fmt: skip
    follow(
        Job(
            id="job_1",
            status="succeeded",
            stage="done",
            progress=1.0,
            created_at=now,
            messages=["built", "model 'a\x1b[2Jb\rc' done"],
        )  # a name with control characters
    )
    lines = out.getvalue().splitlines()
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", out.getvalue())
    assert lines.count("  · built") == 1 and "  · model 'a [2Jb c' done" in lines
    status_lines = [line for line in lines if line.startswith("job_1 ")]
    # one per 5 s over the 50 s (at 0, 5, …, 45), whatever the stage did, + the last
    assert len(status_lines) == 10 + 1, status_lines
    assert status_lines[-1] == "job_1 100.0% succeeded · done"
    assert LOG_INTERVAL_S == 5.0


#: A job report of 3 batch sizes: 6 + 3 × 3 + 4 = 16 columns in the server's markdown.
REPORT = {
    "job_id": "job_x",
    "network": "digits",
    "hardware": {"cpu_model": "Some CPU", "threads": 2},
    "messages": ["int8 kept 3 nodes in float"],
    "rows": [
        {
            "network": "digits", "engine": engine, "precision": precision, "backend": "onnxruntime-cpu",
            "lineage": {"label": label} if label else {},
            "latency": {str(b): {"mean_ms": 0.5 * b, "p50_ms": 0.48 * b, "p99_ms": 0.9 * b,
                                 "throughput_per_s": 2000.0} for b in (1, 8, 32)},
            "top1": 0.9861, "top5": 1.0, "top1_agreement": 0.99, "cosine_similarity": None,
            "size_mb": 0.412, "params": 102_000, "macs": 1_900_000,
            "speedup": None if engine == "original" else {"1": 2.31, "8": 2.05, "32": 1.9},
            "top1_delta": None if engine == "original" else -0.012,
        }
        for engine, precision, label in [
            ("original", "fp32", None),
            ("eng_0123456789abcdef01", "int8", "int8 onnxruntime-cpu · pruned 30 % (l1) · 3 in float"),
            ("eng_fedcba9876543210fe", "fp16", "fp16 [/] \x1b[2J"),  # markup and an escape: shown as text
        ]
    ],
}  # fmt: skip

TABLE = f"""
import json, sys
from optiforge_client.reports import job_report_columns
from optiforge_client.terminal import terminal_console
from optiforge_client.tables import print_fitted
report = json.loads({json.dumps(json.dumps(REPORT))})
print_fitted(terminal_console(sys.stdout), report["rows"], job_report_columns(report), "digits", "see md")
"""


@pytest.mark.parametrize("columns", [80, 120, 250, 36])
def test_report_table_fits_the_terminal(columns: int) -> None:
    screen, output = _terminal(TABLE, columns)
    lines = screen.text()
    assert screen.wraps == 0 and all(len(line) <= columns for line in lines), lines
    assert "\r" not in output.replace("\r\n", "\n")  # printed once, never redrawn
    assert "\x1b[2J" not in output and any("fp16 [/]" in line for line in lines), lines
    for engine in ("original", "eng_0123456789abcdef01", "eng_fedcba9876543210fe"):
        assert any(engine in line for line in lines), (engine, lines)
    if columns >= 80:  # a table: a header row, a rule, a row per engine; the speed of batch 1 kept
        header = next(line for line in lines if "Engine" in line)
        assert "Speedup b=1" in header and "Δ top-1" in header, lines
        row = next(line for line in lines if "eng_0123456789abcdef01" in line)
        assert "2.31×" in row and "-1.20 pt" in row, row
        assert any("at a wider terminal" in line for line in lines) == (columns < 250), lines
    else:  # too narrow for even the first columns side by side: each row stacked
        assert "Speedup b=1: 2.31×" in [line.strip() for line in lines], lines


# ---------------------------------------------------------------- against a live server


def _own_model(digits: DigitsArtifacts, path: Path) -> Path:
    """The digits model as a file of this test's own: uploads are deduplicated by content, so the
    shared file would come back under the name another test gave it."""
    import onnx

    model = onnx.load(str(digits.onnx_path))
    model.doc_string = path.stem
    onnx.save(model, str(path))
    return path


def _optiforge_argv(digits: DigitsArtifacts, model: Path) -> list[str]:
    return [
        sys.executable, "-m", "app.cli", "optimize", str(model),
        "--calib", str(digits.calib_npz), "--eval", str(digits.eval_npz),
        "--precision", "int8", "--batch-sizes", "1,8,32", "--wait",
    ]  # fmt: skip


def test_optimize_in_an_80_column_terminal(
    embedded_stack: LiveStack, digits: DigitsArtifacts, tmp_path: Path
) -> None:
    env = {**embedded_stack.env, "OPTIFORGE_URL": embedded_stack.base_url}
    argv = _optiforge_argv(digits, _own_model(digits, tmp_path / "digits.onnx"))
    status, output = run_in_terminal(argv, env, columns=80, cwd=str(REPO_ROOT))
    screen = Screen(80).feed(output)
    lines = screen.text()
    assert status == 0, "\n".join(lines)
    assert screen.wraps == 0, lines
    assert all(len(line) <= 80 for line in lines)
    progress = [line for line in lines if re.search(r"\d% (queued|running|succeeded)", line)]
    assert len(progress) == 1 and "100.0% succeeded" in progress[0], lines
    assert "Traceback" not in output
    header = next(line for line in lines if line.lstrip().startswith("Engine"))
    assert "Speedup b=1" in header, lines
    int8 = [line for line in lines if re.search(r"eng_\w+", line) and "×" in line]
    assert int8, lines
    # line feeds: what was printed once (model, datasets, messages, table), never one per poll
    assert output.count("\n") < 40, output.count("\n")


def test_optimize_redirected_to_a_file(
    embedded_stack: LiveStack, digits: DigitsArtifacts, tmp_path: Path
) -> None:
    env = {**embedded_stack.env, "OPTIFORGE_URL": embedded_stack.base_url}
    log = tmp_path / "optimize.log"
    with log.open("w") as handle:
        run = subprocess.run(
            _optiforge_argv(digits, _own_model(digits, tmp_path / "digits.onnx")),
            env=env,
            cwd=REPO_ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    text = log.read_text()
    assert run.returncode == 0, text
    assert "\x1b" not in text and "\r" not in text, repr(text[:500])
    assert "| digits |" in text and "100.0% succeeded" in text  # the server's markdown table, as it is
    status_lines = [line for line in text.splitlines() if re.match(r"job_\w+ +\d+\.\d% ", line)]
    stages = {line.split(" · ")[-1] for line in status_lines}
    assert len(status_lines) <= 2 * len(stages) + 4, status_lines  # per stage, and every 5 s at most
    assert len(text.splitlines()) < 60, text


@pytest.mark.slow  # a budgeted search, about a minute
def test_budgeted_search_in_an_80_column_terminal(embedded_stack: LiveStack, digits: DigitsArtifacts) -> None:
    env = {**embedded_stack.env, "OPTIFORGE_URL": embedded_stack.base_url}
    argv = [
        sys.executable, "-m", "app.cli", "optimize", str(digits.onnx_path), "--eval", str(digits.eval_npz),
        "--calib", str(digits.calib_npz), "--budget", "1%", "--objective", "latency@8", "--time-budget", "1",
        "--target", "onnxruntime-cpu", "--wait",
    ]  # fmt: skip
    status, output = run_in_terminal(argv, env, columns=80, timeout=400, cwd=str(REPO_ROOT))
    screen = Screen(80).feed(output)
    lines = screen.text()
    assert status == 0, "\n".join(lines)
    assert screen.wraps == 0 and all(len(line) <= 80 for line in lines), lines
    progress = [line for line in lines if re.search(r"\d% (queued|running|succeeded)", line)]
    assert len(progress) == 1 and "100.0% succeeded" in progress[0], lines
    header = next(line for line in lines if line.lstrip().startswith("Candidate"))
    assert "Outcome" in header and "Speedup" in header and "Drop pt" in header, lines
    assert any(" chosen " in f" {line} " for line in lines), lines
    assert "Traceback" not in output


#: An auto-optimize report as the server writes it (engines.search.report), long labels and reasons.
SEARCH = {
    "objective": {"metric": "latency", "batch_size": 8},
    "budget": {"metric": "top1", "max_drop": 0.01, "relative": False},
    "allowed_drop": 0.01,
    "chosen": "onnxruntime-cpu int8 nncf",
    "elapsed_s": 15.2,
    "timed_out": False,
    "original": {"cost": 0.363},
    "original_lineage": {"label": "original (onnxruntime-cpu fp32)"},
    "messages": ["chosen: onnxruntime-cpu int8 nncf"],
    "candidates": [
        {"label": label, "status": status, "chosen": chosen, "cost": cost, "quick_ratio": 0.9,
         "drop": drop, "on_front": front, "reason": reason, "estimated_seconds": 4.0}
        for label, status, chosen, cost, drop, front, reason in [
            ("onnxruntime-cpu fp32", "accepted", False, 0.363, 0.0, False, ""),
            ("onnxruntime-cpu int8 nncf", "accepted", True, 0.338, 0.004, True, ""),
            ("onnxruntime-cpu pruned 0.3 (l1) int8 minmax · 3 in float", "rejected_accuracy", False, None,
             0.0427, False, "drop 4.27 pt is over the budget of 1.00 pt even with 3 nodes kept in float"),
            ("openvino-cpu int8", "skipped_time", False, None, None, False, "the time budget ran out"),
        ]
    ],
}  # fmt: skip

SEARCH_TABLE = f"""
import json, sys
from optiforge_client.reports import autotune_columns, original_row
from optiforge_client.terminal import terminal_console
from optiforge_client.tables import print_fitted
report = json.loads({json.dumps(json.dumps(SEARCH))})
rows = [original_row(report), *report["candidates"][:3]]
print_fitted(terminal_console(sys.stdout), rows, autotune_columns(report), "search")
"""


@pytest.mark.parametrize("columns", [80, 160])
def test_search_table_fits_the_terminal(columns: int) -> None:
    screen, _output = _terminal(SEARCH_TABLE, columns)
    lines = screen.text()
    assert screen.wraps == 0 and all(len(line) <= columns for line in lines), lines
    header = next(line for line in lines if line.startswith("Candidate"))
    assert all(name in header for name in ("Outcome", "Speedup", "Drop pt")), header
    chosen = next(line for line in lines if "nncf" in line)
    assert "chosen" in chosen and "1.07×" in chosen and "0.40" in chosen, chosen
    original = next(line for line in lines if line.startswith("original (onnxruntime-cpu fp32)"))
    assert "reference" in original and "1.00×" in original, original
    assert ("0.363" in original) == (columns >= 160), original  # the cost: a wider terminal's
    rejected = next(line for line in lines if "rejected accuracy" in line)
    assert "4.27" in rejected and ("Why" in header) == (columns >= 160), lines
