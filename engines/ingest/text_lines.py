"""The lines of a text dataset: a JSONL file read one line at a time, each checked, its labels
collected (engines.ingest.texts tokenizes what this reads).

A line is a JSON object `{"text": "...", "text_pair": "...", "label": 3}`; `text_pair` and `label`
are optional, other keys ignored, blank lines skipped (but counted: a line number is the one an
editor shows). A label is a class index, or a class name, mapped through a class list when one is
given, else through the sorted names (as image class folders are); every line is labelled, or
none, and in one way. Refusals name the line (`line`, 1-based): `invalid_json_line`,
`missing_text`, `invalid_text`, `invalid_label`, `line_too_long`; and `too_many_samples`.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from engines.errors import InvalidDatasetError
from engines.ingest.limits import DatasetLimits

#: A class name longer than this is not a class name (and memory holds each distinct one).
MAX_CLASS_NAME = 256
_UTF8_BOM = b"\xef\xbb\xbf"


def line_error(line: int, detail: str, code: str) -> InvalidDatasetError:
    """A refusal about one line: `line` in the body, and in the sentence."""
    return InvalidDatasetError(f"line {line}: {detail}", code=code, extra={"line": line})


def looks_like_jsonl(path: Path) -> bool:
    """Whether the file starts as a JSONL of objects does (`{`, after a BOM and blanks): what an
    upload without its tokenizer is told it needs one for."""
    with path.open("rb") as stream:
        head = stream.read(4096)
    return head.removeprefix(_UTF8_BOM).lstrip().startswith(b"{")


@dataclass(frozen=True)
class TextLine:
    line: int  # 1-based, blank lines counted
    text: str
    pair: str | None
    label: int | str | None


def iter_lines(path: Path, max_line_bytes: int) -> Iterator[TextLine]:
    """Each non-blank line, checked (see the module's docstring); memory is one line."""
    with path.open("rb") as stream:
        yield from _lines(stream, max_line_bytes)


def _lines(stream: IO[bytes], max_line_bytes: int) -> Iterator[TextLine]:
    number = 0
    while raw := stream.readline(max_line_bytes + 1):
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            raise line_error(
                number,
                f"the line is over the limit of {max_line_bytes} bytes: split the text, or truncate it "
                "before uploading",
                "line_too_long",
            )
        if number == 1 and raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM) :]
        if not raw.strip():
            continue
        yield _parse(raw, number)


def _parse(raw: bytes, number: int) -> TextLine:
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise line_error(number, f"the line is not UTF-8 text ({exc.reason})", "invalid_json_line") from exc
    except (ValueError, RecursionError) as exc:
        raise line_error(number, f"the line is not JSON ({exc})", "invalid_json_line") from exc
    if not isinstance(value, dict):
        raise line_error(
            number,
            f'the line is a JSON {type(value).__name__}, not an object such as {{"text": "...", "label": 0}}',
            "invalid_json_line",
        )
    text = value.get("text")
    if not isinstance(text, str) or not text.strip():
        what = 'has no "text"' if text is None else f'has a "text" that is {_kind(text)}'
        raise line_error(number, f"the line {what}; each line needs a non-empty text string", "missing_text")
    pair = value.get("text_pair")
    if pair is not None and not isinstance(pair, str):
        raise line_error(number, f'"text_pair" is {_kind(pair)}; it must be a string', "invalid_text")
    for name, item in (("text", text), ("text_pair", pair)):
        if item is not None and not _encodable(item):
            raise line_error(
                number, f'"{name}" holds an unpaired surrogate escape (\\ud800…)', "invalid_text"
            )
    label = value.get("label")
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, int | str):
            raise line_error(
                number, f'"label" is {_kind(label)}: a class index (0, 1, …) or a class name', "invalid_label"
            )
        if isinstance(label, int) and not 0 <= label < 2**31:
            raise line_error(number, f'"label" {label} is not a class index >= 0', "invalid_label")
        if isinstance(label, str) and not 0 < len(label) <= MAX_CLASS_NAME:
            raise line_error(
                number, f"a class name must be 1 to {MAX_CLASS_NAME} characters", "invalid_label"
            )
    return TextLine(number, text, pair, label)


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "an empty string"
    return "null" if value is None else f"a JSON {type(value).__name__}"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class TextLines:
    """What the first reading of the lines found: their number and labels."""

    samples: int
    labels: np.ndarray | None  # int64 class indices; None when unlabelled
    class_names: tuple[str, ...] | None  # label i is class_names[i]; None for index labels
    pairs: int  # lines with a text_pair


def scan_lines(
    path: Path, *, max_line_bytes: int, limits: DatasetLimits, classes: Sequence[str] | None = None
) -> TextLines:
    """Every line checked and counted, labels read (all lines labelled, or none; indices or names
    throughout), in the memory of one line and the labels."""
    class_list = _class_list(classes)
    index = {name: i for i, name in enumerate(class_list or ())}
    labels = array("q")
    seen_names: dict[str, int] = {}
    first: TextLine | None = None
    samples = pairs = 0
    for entry in iter_lines(path, max_line_bytes):
        samples += 1
        limits.check_samples(samples)  # refused as soon as it is over: the rest is never read
        pairs += entry.pair is not None
        first = first or entry
        _check_label_kind(entry, first)
        if entry.label is None:
            continue
        if isinstance(entry.label, str):
            if class_list is not None:
                if entry.label not in index:
                    raise line_error(
                        entry.line,
                        f"label '{entry.label}' is not one of the {len(class_list)} classes given",
                        "invalid_label",
                    )
                labels.append(index[entry.label])
            else:
                labels.append(seen_names.setdefault(entry.label, len(seen_names)))
        else:
            if class_list is not None and entry.label >= len(class_list):
                raise line_error(
                    entry.line,
                    f"label {entry.label} is past the {len(class_list)} classes given",
                    "invalid_label",
                )
            labels.append(entry.label)
    if samples == 0:
        raise InvalidDatasetError('the file holds no lines; each line is a JSON object {"text": "..."}')
    if first is None or first.label is None:
        return TextLines(samples, None, None, pairs)
    values = np.frombuffer(labels, dtype=np.int64).copy()
    names: tuple[str, ...] | None = class_list
    if isinstance(first.label, str) and class_list is None:
        names = tuple(sorted(seen_names))  # sorted as image class folders are
        order = np.empty(len(seen_names), dtype=np.int64)
        for rank, name in enumerate(names):
            order[seen_names[name]] = rank
        values = order[values]
    return TextLines(samples, values, names, pairs)


def _check_label_kind(entry: TextLine, first: TextLine) -> None:
    if (entry.label is None) != (first.label is None):
        labelled, unlabelled = (first, entry) if first.label is not None else (entry, first)
        raise line_error(
            entry.line,
            f"line {labelled.line} has a label and line {unlabelled.line} has none: label every line, "
            "or none",
            "invalid_label",
        )
    if entry.label is not None and isinstance(entry.label, str) != isinstance(first.label, str):
        raise line_error(
            entry.line,
            f"line {first.line} labels by {'name' if isinstance(first.label, str) else 'class index'} and "
            f"this line by {'name' if isinstance(entry.label, str) else 'class index'}: use one throughout",
            "invalid_label",
        )


def _class_list(classes: Sequence[str] | None) -> tuple[str, ...] | None:
    if classes is None:
        return None
    if isinstance(classes, str | bytes) or not all(isinstance(name, str) and name for name in classes):
        raise InvalidDatasetError("classes must be a list of non-empty class names", code="invalid_labels")
    names = tuple(classes)
    if not names or len(set(names)) != len(names):
        raise InvalidDatasetError("the class list is empty or names a class twice", code="invalid_labels")
    return names
