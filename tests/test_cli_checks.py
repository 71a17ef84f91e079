"""What the CLI refuses before it uploads anything, in the words of its flags, without a
traceback; and the SDK's copy of the server's bounds, checked against the server's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from optiforge_client import checks, limits
from optiforge_client.errors import ValidationFailed
from optiforge_client.hints import image_size

from app.api import schemas
from tests.conftest import REPO_ROOT

#: A port nothing listens on: a command that sent a request would say "cannot reach".
DEAD_URL = "http://127.0.0.1:9"


def test_sdk_limits_are_the_servers() -> None:
    from engines.search.space import OBJECTIVE_METRICS

    assert tuple(OBJECTIVE_METRICS) == limits.OBJECTIVE_METRICS
    assert limits.MIN_TIME_BUDGET_MINUTES == schemas.MIN_TIME_BUDGET_MINUTES
    assert limits.MAX_BUDGET_DROP == schemas.MAX_BUDGET_DROP
    field = schemas.AutotuneCreate.model_fields["time_budget_minutes"]
    assert any(getattr(bound, "ge", None) == limits.MIN_TIME_BUDGET_MINUTES for bound in field.metadata)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "optiforge_client.cli", *args, "--url", DEAD_URL],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Files that exist (never read: every command here stops before sending them)."""
    paths = {}
    for name in ("model.onnx", "calib.npz", "eval.npz"):
        (tmp_path / name).write_bytes(b"x")
        paths[name.split(".")[0]] = str(tmp_path / name)
    (tmp_path / "recipe.json").write_text(json.dumps({"precision": "int8"}))
    (tmp_path / "broken.json").write_text("{precision: int8")
    paths["recipe"], paths["broken"] = str(tmp_path / "recipe.json"), str(tmp_path / "broken.json")
    return paths


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["optimize", "{model}", "--precision", "int8"], ["--precision int8", "--calib"]),
        (["optimize", "{model}", "--recipe", "{recipe}"], ["the recipe's precision int8", "--calib"]),
        (["optimize", "{model}", "--precision", "int8", "--prune", "l1", "--finetune-epochs", "2", "--calib",
          "{calib}", "--eval", "missing.npz"], ["--eval missing.npz: no such file"]),
        (["optimize", "missing.onnx", "--calib", "{calib}"], ["model file missing.onnx: no such file"]),
        (["optimize", "{model}", "--calib", "missing.npz"], ["--calib missing.npz: no such file"]),
        (["optimize", "{model}", "--budget", "1%"], ["--budget needs an evaluation set", "--eval"]),
        (["optimize", "{model}", "--budget", "1%", "--eval", "{eval}", "--time-budget", "0.5"],
         ["--time-budget 0.5", "minimum of 1"]),
        (["optimize", "{model}", "--budget", "1%", "--eval", "{eval}", "--precision", "int8"],
         ["--precision int8", "--calib"]),
        (["optimize", "{model}", "--recipe", "{broken}"], ["--recipe", "not JSON"]),
        (["optimize", "{model}", "--recipe", "missing.json"], ["--recipe missing.json: no such file"]),
        (["jobs", "create", "mdl_x", "--precision", "int8"], ["--precision int8", "--calib"]),
        (["datasets", "upload", "missing.zip"], ["dataset file missing.zip: no such file"]),
        (["datasets", "upload", "{calib}", "--tokenizer", "{calib}", "--tokenization", "{broken}"],
         ["--tokenization", "not JSON"]),
        (["datasets", "upload", "{calib}", "--tokenizer", "missing.json"], ["--tokenizer missing.json: no"]),
        (["datasets", "upload", "{calib}", "--tokenizer", "{calib}", "--preprocessing", "size=[8,8]"],
         ["--preprocessing and --input-name apply to a .zip of images"]),
        (["models", "upload", "missing.onnx"], ["model file missing.onnx: no such file"]),
        (["infer", "e", "--input", "x=missing.npy"], ["--input missing.npy: no such file"]),
    ],
)  # fmt: skip
def test_refused_before_any_request(argv: list[str], says: list[str], files: dict[str, str]) -> None:
    run = _cli(*(arg.format(**files) for arg in argv))
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr  # one line, no traceback
    for part in says:
        assert part in lines[0], lines[0]
    assert "calibration_dataset_id" not in run.stderr and "cannot reach" not in run.stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["optimize", "m.onnx", "--batch-sizes", "1,x"], "argument --batch-sizes"),
        (["optimize", "m.onnx", "--budget", "lots"], "argument --budget"),
        (["optimize", "m.onnx", "--objective", "latency@x"], "argument --objective"),
        (["optimize", "m.onnx", "--objective", "speed@8"], "argument --objective"),
        (["datasets", "upload", "d.zip", "--preprocessing", "size"], "argument --preprocessing"),
        (["jobs", "delete"], "the following arguments are required: id"),
    ],
)
def test_bad_options_name_the_option(argv: list[str], says: str) -> None:
    run = _cli(*argv)
    assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_unreachable_server_is_one_line(files: dict[str, str]) -> None:
    run = _cli("models", "list")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and "--url" in run.stderr


def test_server_sentences_name_flags() -> None:
    error = ValidationFailed(
        422, "invalid_recipe", "int8 needs a calibration dataset: give calibration_dataset_id"
    )
    assert checks.cli_message(error) == "invalid_recipe: int8 needs a calibration dataset: give --calib"
    assert checks.in_flags("held by alias 'prod'; pass force=true to delete it anyway") == (
        "held by alias 'prod'; pass --force to delete it anyway"
    )
    assert checks.in_flags("time_budget_minutes 0.5 is under 1; evaluation_dataset_id") == (
        "--time-budget 0.5 is under 1; --eval"
    )
    assert checks.in_flags("my_calibration_dataset_id_x") == "my_calibration_dataset_id_x"


def test_image_size_mismatch_suggests_the_preprocessing() -> None:
    detail = (
        "calibration dataset 'input': sample dim 1 is 224, model expects 64 "
        "(shape [3, 224, 224] vs ['batch', 3, 64, 64])"
    )
    assert image_size(detail) == (64, 64)
    message = checks.cli_message(ValidationFailed(422, "dataset_mismatch", detail))
    assert "--preprocessing 'size=[64,64]'" in message
    channels_last = "dim 1 is 224, model expects 32 (shape [224, 224, 3] vs [None, 32, 48, 3])"
    assert image_size(channels_last) == (32, 48)
    per_row = (
        "input 'input': each row has dim 1 is 224, model expects 32 (shape [1, 224, 224] vs [1, 32, 32])"
    )
    assert image_size(per_row) == (32, 32)
    assert image_size("dim 1 is 5, model expects 7 (shape [5] vs [None, 7])") is None
    already = detail + '; upload it with preprocessing={"size": [64, 64]}'
    assert image_size(already) is None


def test_sdk_error_carries_the_preprocessing_hint() -> None:
    from optiforge_client.errors import error_from_response

    detail = (
        "evaluation dataset 'input': sample dim 1 is 224, model expects 64 "
        "(shape [3, 224, 224] vs [None, 3, 64, 64])"
    )
    error = error_from_response(422, {"code": "dataset_mismatch", "detail": detail}, "")
    assert isinstance(error, ValidationFailed) and error.detail == detail
    assert error.hint and 'preprocessing={"size": [64, 64]}' in error.hint and error.hint in str(error)
    assert error_from_response(422, {"code": "invalid_recipe", "detail": "no"}, "").hint is None


def test_server_suggestion_of_a_size_reads_as_the_flag() -> None:
    detail = 'dim 1 is 224, model expects 64; upload it with preprocessing={"size": [64, 64]}'
    message = checks.cli_message(ValidationFailed(422, "dataset_mismatch", detail))
    assert message.endswith("upload it with --preprocessing 'size=[64,64]'"), message
    assert message.count("--preprocessing") == 1
