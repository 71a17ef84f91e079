"""What the CLI checks before it uploads anything, and how it words the server's errors.

A mistake found after a 100 MB upload costs the upload; the ones the CLI can see in its own
options (INT8 without a calibration set, a time budget under the server's minimum, a file that
is not there) are refused first. Errors speak of the CLI's flags, never of the API's fields
(`--calib`, not `calibration_dataset_id`), and never as a traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from optiforge_client.errors import OptiforgeError
from optiforge_client.hints import image_size
from optiforge_client.limits import MIN_TIME_BUDGET_MINUTES

#: Id prefixes the CLI takes where it takes a file: an uploaded model or dataset, used as it is.
MODEL_ID_PREFIX, DATASET_ID_PREFIX = "mdl_", "ds_"

#: API field names in the server's sentences -> the CLI's flags that set them.
_FLAGS = {
    "calibration_dataset_id": "--calib",
    "evaluation_dataset_id": "--eval",
    "time_budget_minutes": "--time-budget",
    "max_drop": "--budget",
    "force=true": "--force",
    "batch_sizes": "--batch-sizes",
    "sequence_lengths": "--sequence-lengths",
}
_FLAG_PATTERN = re.compile(r"(?<![\w-])(" + "|".join(re.escape(name) for name in _FLAGS) + r")(?![\w-])")


class UsageError(Exception):
    """A mistake in the command line, found before anything was sent: its message names the
    flag and what to write instead. The CLI prints it on one line and exits with status 2."""


#: API routes (and form fields) the server's sentences point to -> the CLI's words for them.
_COMMANDS = [
    (re.compile(r"POST /v1/jobs/([\w-]+)/cancel"), r"optiforge jobs cancel \1"),
    (re.compile(r"PUT /v1/engines/\{id\}/alias"), "optiforge engines alias ID ALIAS"),
    (re.compile(r'preprocessing=\{"size": \[(\d+), (\d+)\]\}'), r"--preprocessing 'size=[\1,\2]'"),
]


def in_flags(sentence: str) -> str:
    """The server's `sentence` in the CLI's words: its flags for the API's field names, its
    commands for the API's routes."""
    sentence = _FLAG_PATTERN.sub(lambda match: _FLAGS[match.group(1)], sentence)
    for route, command in _COMMANDS:
        sentence = route.sub(command, sentence)
    return sentence


def cli_message(error: OptiforgeError) -> str:
    """`code: sentence` of a server error for a person at the CLI: flags named as flags, and for
    images of the wrong size, the --preprocessing that fixes it."""
    message = f"{error.code}: {in_flags(error.detail)}"
    size = image_size(error.detail)
    if size is not None:
        message += (
            f"; if that dataset is a .zip of images, upload it again with "
            f"--preprocessing 'size=[{size[0]},{size[1]}]'"
        )
    return message


def existing_file(path: str, flag: str) -> Path:
    """`path` as a Path, or UsageError naming `flag` when it is not a readable file."""
    file = Path(path).expanduser()
    if not file.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if not file.is_file():
        raise UsageError(f"{flag} {path}: not a file")
    return file


def is_model_id(value: str) -> bool:
    return value.startswith(MODEL_ID_PREFIX) and not Path(value).exists()


def is_dataset_id(value: str) -> bool:
    return value.startswith(DATASET_ID_PREFIX) and not Path(value).exists()


def model_or_file(value: str, flag: str) -> str | Path:
    """An uploaded model's id (`mdl_…`) as it is, else the file, which must exist."""
    return value if is_model_id(value) else existing_file(value, flag)


def dataset_or_file(value: str | None, flag: str) -> str | Path | None:
    """An uploaded dataset's id (`ds_…`) as it is, else the file, which must exist."""
    if value is None:
        return None
    return value if is_dataset_id(value) else existing_file(value, flag)


def json_object_file(path: str | None, flag: str, example: str) -> dict[str, Any]:
    """The JSON object in the file an option names ({} without one); UsageError naming `flag`
    when the file is missing, not JSON, or not an object (`example` shows one)."""
    if not path:
        return {}
    text = existing_file(path, flag).read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} {path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} {path}: a JSON object, e.g. {example}")
    return value


def recipe_file(path: str | None) -> dict[str, Any]:
    """The --recipe file's JSON object ({} without one)."""
    return json_object_file(path, "--recipe", '{"precision": "int8"}')


def check_recipe_data(recipe: dict[str, Any], has_calibration: bool, from_flag: bool) -> None:
    """What a recipe needs from the data options, refused before anything is uploaded."""
    if has_calibration:
        return
    where = "--precision int8" if from_flag else "the recipe's precision int8"
    if recipe.get("precision") == "int8":
        raise UsageError(
            f"{where} needs a calibration set: add --calib FILE.npz (a few hundred samples of "
            "the model's inputs) or --calib ds_… (an uploaded dataset); int8-dynamic needs none"
        )
    if recipe.get("finetune") is not None:
        raise UsageError(
            "--finetune-epochs trains on the calibration set: add --calib FILE.npz (with labels)"
        )
    if recipe.get("qat") is not None:
        raise UsageError("quantization-aware training trains on the calibration set: add --calib FILE.npz")


def check_search(
    has_evaluation: bool, time_budget: float, precision: str | None, has_calibration: bool
) -> None:
    """An auto-optimize search (`--budget`): refused before anything is uploaded when it cannot run."""
    if not has_evaluation:
        raise UsageError(
            "--budget needs an evaluation set: add --eval FILE.npz (every candidate is scored on it)"
        )
    if time_budget < MIN_TIME_BUDGET_MINUTES:
        raise UsageError(
            f"--time-budget {time_budget:g} is under the server's minimum of {MIN_TIME_BUDGET_MINUTES:g} "
            "minute(s): not even the cheapest candidates and the final timing fit; give "
            f"--time-budget {MIN_TIME_BUDGET_MINUTES:g} or more"
        )
    if precision == "int8" and not has_calibration:
        raise UsageError(
            "--precision int8 with --budget searches INT8 engines, which need a calibration set: "
            "add --calib FILE.npz or --calib ds_…"
        )
