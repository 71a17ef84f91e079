"""Text datasets: a JSONL file of texts and a `tokenizer.json` become the arrays of an `.npz`.

Each line is a JSON object: `{"text": "...", "text_pair": "...", "label": 3}` (`text_pair` and
`label` optional; a label is a class index, or a class name mapped through a class list, sorted
when none is given, as image folders are). Blank lines are skipped; other keys are ignored. The
texts are tokenized by the Hugging Face `tokenizers` library (the Rust tokenizer every
`transformers` fast tokenizer is; no torch, no transformers, no network) from the tokenizer's own
`tokenizer.json`, by a `TextTokenization` spec stored with the dataset, as an image folder's
preprocessing spec is: max_length, truncation, padding (`max_length` or `longest`, the longest
line of the dataset), the side padded, special tokens, and the arrays to produce.

The arrays are what a `transformers` tokenizer gives a model: `input_ids`, `attention_mask` and
`token_type_ids`, named as the model names its inputs. A dataset uploaded for a model (`TextModel`)
takes the model's input names (exactly, or as the usual aliases: `input_mask`, `segment_ids`, …) and
dtypes (int64 or int32); the tokenizer's vocabulary is checked against the word-embedding table
its `input_ids` index (engines.ingest.embeddings), and the type ids against the token-type table.

Bounds (checked before the work they bound): the tokenizer file's bytes, each line's bytes, the
number of lines (DatasetLimits.max_samples) and the arrays' bytes (samples × max_length × dtype,
before any text is tokenized). The tokenizer itself is never loaded in this process: a child
process loads it and tokenizes (engines.ingest.bounded_tokenize, the work in
engines.ingest.text_rows), within a deadline and a memory cap (TextLimits), since a user's
tokenizer.json can make the library take unbounded time or memory. Memory is one chunk of lines
and their encodings: the child writes the rows into `.npy` files made here at their full size,
then this process writes them into the `.npz`, as engines.ingest.image_npz writes images; nothing
is left behind on error.

Refusals raise InvalidDatasetError with a code; those about one line carry `line` (1-based, blank
lines counted; engines.ingest.text_lines reads and checks the lines): `invalid_json_line` (not
UTF-8, not JSON, not an object), `missing_text` (no text, or not a non-empty string),
`invalid_text` (a text or text_pair that is not a string of Unicode characters), `invalid_label`,
`line_too_long`, `text_too_long` (more tokens than max_length: with truncation off, or special
tokens alone over it), `tokenization_failed` (the tokenizer raised on it). Others:
`invalid_tokenizer`, `tokenizer_too_large`, `tokenizer_too_slow` and `tokenizer_out_of_memory` (the
child's bounds), `invalid_tokenization` (the spec), `unknown_input_name`
(a name the model has not), `input_names_required` (no model input is input_ids),
`sequence_too_long` (max_length over the model's position table), `vocab_exceeds_embedding`,
`type_ids_exceed_embedding`, `too_many_samples`, `dataset_too_large`, `invalid_dataset`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np

from engines.errors import DatasetMismatchError, InvalidDatasetError
from engines.ingest.bounded_tokenize import TokenizerProcess
from engines.ingest.datasets import LABELS_KEY, ArraySpec, DatasetInfo, check_fits_model, inspect_npz
from engines.ingest.limits import DatasetLimits
from engines.ingest.signature import TensorSpec
from engines.ingest.spec_fields import spec_values
from engines.ingest.text_lines import TextLines, scan_lines
from engines.ingest.text_rows import (
    PadIds,
    ProgressFn,
    RowsFile,
    RowsRequest,
    TextResult,
    check_tokenizer_bytes,
)

Role = Literal["input_ids", "attention_mask", "token_type_ids"]
Padding = Literal["max_length", "longest"]
PaddingSide = Literal["right", "left"]
TextDType = Literal["int64", "int32"]

ROLES: tuple[str, ...] = get_args(Role)
PADDINGS: tuple[str, ...] = get_args(Padding)
PADDING_SIDES: tuple[str, ...] = get_args(PaddingSide)
TEXT_DTYPES: tuple[str, ...] = get_args(TextDType)
#: Model input names taken for each array when the spec names none (compared without case, and
#: without a TensorFlow-style `:0`): what BERT-family exports call them.
ROLE_ALIASES: dict[str, tuple[str, ...]] = {
    "input_ids": ("input_ids", "ids", "token_ids", "tokens", "input"),
    "attention_mask": ("attention_mask", "input_mask", "mask"),
    "token_type_ids": ("token_type_ids", "segment_ids", "type_ids", "token_type"),
}
#: Where a text dataset keeps its tokenizer, beside its arrays.
TOKENIZER_FILENAME = "tokenizer.json"
DEFAULT_MAX_LENGTH = 128
MAX_SEQUENCE = 32_768


@dataclass(frozen=True)
class TextLimits:
    """Bounds of a text upload beside DatasetLimits (whose max_samples bounds its lines)."""

    max_line_bytes: int = 1024 * 1024
    max_tokenizer_bytes: int = 64 * 1024 * 1024
    #: Seconds the tokenizer's child process may take to load, then to tokenize (a job's: each
    #: chunk of lines); then it is killed: `tokenizer_too_slow`.
    tokenize_timeout_s: float = 60.0
    #: Its address space (RLIMIT_AS); over it: `tokenizer_out_of_memory`.
    tokenizer_memory_bytes: int = 4 * 1024 * 1024 * 1024

    def check_tokenizer_bytes(self, nbytes: int) -> None:
        check_tokenizer_bytes(nbytes, self.max_tokenizer_bytes)


def open_tokenizer(path: Path, limits: TextLimits | None = None) -> TokenizerProcess:
    """The tokenizer.json loading in a bounded child process (a context manager: leaving it kills
    the child); size-checked here first. A refusal of the file itself (`invalid_tokenizer`) comes
    with its `facts()`, or from the first step that needs them."""
    limits = limits or TextLimits()
    limits.check_tokenizer_bytes(path.stat().st_size)
    return TokenizerProcess(
        path,
        max_bytes=limits.max_tokenizer_bytes,
        timeout_s=limits.tokenize_timeout_s,
        memory_bytes=limits.tokenizer_memory_bytes,
    )


def _refuse(detail: str) -> InvalidDatasetError:
    return InvalidDatasetError(detail, code="invalid_tokenization")


def _choice(value: Any, name: str, valid: tuple[str, ...]) -> str:
    text = value.lower() if isinstance(value, str) else value
    if text not in valid:
        raise _refuse(f"{name} must be one of {', '.join(valid)}; got {value!r}")
    return cast(str, text)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise _refuse(f"{name} must be true or false; got {value!r}")
    return value


def _input_names(value: Any) -> tuple[tuple[str, str], ...] | None:
    """A list of arrays (`["input_ids", "attention_mask"]`: each named as itself) or an object of
    array -> model input name (`{"input_ids": "ids"}`), as (array, name) pairs in ROLES' order."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = {role: role for role in value} if all(isinstance(r, str) for r in value) else None
    if not isinstance(value, Mapping) or not value:
        raise _refuse(
            "input_names must be a list of the arrays to produce (input_ids, attention_mask, "
            'token_type_ids) or an object naming the model input of each, e.g. {"input_ids": "ids"}'
        )
    unknown = sorted(str(role) for role in value if role not in ROLES)
    if unknown:
        raise _refuse(f"input_names names {unknown}; the arrays a tokenizer gives are {list(ROLES)}")
    if "input_ids" not in value:
        raise _refuse("input_names must include input_ids")
    names = [value[role] for role in ROLES if role in value]
    if not all(isinstance(name, str) and 0 < len(name) <= 255 for name in names):
        raise _refuse("each input name must be a string of 1 to 255 characters")
    if len(set(names)) != len(names):
        raise _refuse(f"input_names gives one name to two arrays: {names}")
    return tuple((role, value[role]) for role in ROLES if role in value)


@dataclass(frozen=True)
class TextTokenization:
    """How each line becomes one row of each array (`[max_length]`, or the longest line's length).

    `max_length` unset: the model's sequence length where its input fixes one, else 128.
    `truncation`: lines over max_length are cut to it (the tokenizer's `longest_first`, which
    keeps the special tokens); off, such a line is refused, naming it. `padding`: every row padded
    to max_length, or to the longest line of the dataset (`longest`); `padding_side`: where the
    pads go. `input_names`: the arrays to produce and the model input each feeds (unset: the
    model's inputs that are named like them, or all three); `dtype`: the model's (unset), else int64.
    """

    max_length: int | None = None
    truncation: bool = True
    padding: Padding = "max_length"
    padding_side: PaddingSide = "right"
    add_special_tokens: bool = True
    input_names: tuple[tuple[str, str], ...] | None = None
    dtype: TextDType | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        length = self.max_length
        if length is not None and (
            isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_SEQUENCE
        ):
            raise _refuse(f"max_length must be a whole number from 1 to {MAX_SEQUENCE}; got {length!r}")
        put("truncation", _flag(self.truncation, "truncation"))
        put("add_special_tokens", _flag(self.add_special_tokens, "add_special_tokens"))
        put("padding", _choice(self.padding, "padding", PADDINGS))
        put("padding_side", _choice(self.padding_side, "padding_side", PADDING_SIDES))
        if self.dtype is not None:
            put("dtype", _choice(self.dtype, "dtype", TEXT_DTYPES))
        if self.input_names is not None and not isinstance(self.input_names, tuple):
            put("input_names", _input_names(self.input_names))

    @property
    def names(self) -> dict[str, str]:
        """{array: model input name} (after `resolve`)."""
        return dict(self.input_names or ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "truncation": self.truncation,
            "padding": self.padding,
            "padding_side": self.padding_side,
            "add_special_tokens": self.add_special_tokens,
            "input_names": None if self.input_names is None else dict(self.input_names),
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextTokenization:
        """From `to_dict`'s shape, or a user's (any field left out takes its default)."""
        values = spec_values(cls, data, "tokenization", _refuse)
        values["input_names"] = _input_names(values.get("input_names"))
        return cls(**values)


@dataclass(frozen=True)
class TextModel:
    """The model a text dataset is made for: its inputs, and the rows of the embedding table each
    integer input indexes (engines.ingest.embeddings.embedding_rows)."""

    inputs: tuple[TensorSpec, ...]
    embedding_rows: Mapping[str, int] = field(default_factory=dict)
    model_id: str | None = None
    #: The longest sequence its position table holds (engines.ingest.sequence); None: no limit found.
    max_positions: int | None = None

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [spec.to_dict() for spec in self.inputs],
            "embedding_rows": dict(self.embedding_rows),
            "model_id": self.model_id,
            "max_positions": self.max_positions,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextModel:
        return cls(
            inputs=tuple(TensorSpec.from_dict(spec) for spec in data["inputs"]),
            embedding_rows={str(name): int(rows) for name, rows in data["embedding_rows"].items()},
            model_id=data.get("model_id"),
            max_positions=data.get("max_positions"),
        )


def _alias_of(name: str) -> str:
    base = name.lower()
    return base[:-2] if base.endswith(":0") else base


def _model_names(spec: TextTokenization, model: TextModel) -> tuple[tuple[str, str], ...]:
    """The (array, model input) pairs for this model: the stated ones, each an input of the model,
    or the model's inputs named like the arrays."""
    names = [input_spec.name for input_spec in model.inputs]
    if spec.input_names is not None:
        for role, name in spec.input_names:
            if name not in names:
                raise InvalidDatasetError(
                    f"input_names gives {role} to '{name}', which is not an input of the model "
                    f"(its inputs: {names})",
                    code="unknown_input_name",
                    extra={"input_name": name, "model_inputs": names},
                )
        return spec.input_names
    found: list[tuple[str, str]] = []
    for role in ROLES:
        match = next((name for name in names if _alias_of(name) in ROLE_ALIASES[role]), None)
        if match is not None and match not in (taken for _, taken in found):
            found.append((role, match))
    if not any(role == "input_ids" for role, _ in found):
        raise InvalidDatasetError(
            f"no input of the model is named like input_ids (its inputs: {names}): name the model "
            'input of each array in the tokenization spec, e.g. "input_names": {"input_ids": '
            f'"{names[0]}"}}',
            code="input_names_required",
            extra={"model_inputs": names},
        )
    return tuple(found)


def _sequence_dim(input_spec: TensorSpec) -> int | str | None:
    """The model input's sequence dim: its one dim besides the batch (None when it has not one)."""
    sample = input_spec.sample_shape()
    return sample[0] if len(sample) == 1 else None


def resolve(spec: TextTokenization, model: TextModel | None) -> tuple[TextTokenization, dict[str, str]]:
    """The spec with max_length and input_names set, and each array's dtype: the model's when the
    dataset is made for one (a stated dtype must agree), else the stated one or int64."""
    if model is None:
        names = spec.input_names or tuple((role, role) for role in ROLES)
        dtype = spec.dtype or "int64"
        resolved = replace(
            spec, input_names=names, max_length=spec.max_length or DEFAULT_MAX_LENGTH, dtype=dtype
        )
        return resolved, {role: dtype for role, _ in names}
    names = _model_names(spec, model)
    dtypes: dict[str, str] = {}
    fixed: int | None = None
    for role, name in names:
        input_spec = model.input(name)
        assert input_spec is not None
        declared = input_spec.dtype if input_spec.dtype in TEXT_DTYPES else "int64"  # else: a mismatch, later
        if spec.dtype is not None and spec.dtype != declared:
            raise _refuse(
                f"dtype {spec.dtype} differs from the model's input '{name}' ({declared}): leave it unset"
            )
        dtypes[role] = declared
        dim = _sequence_dim(input_spec)
        if isinstance(dim, int):
            fixed = dim
    limit = model.max_positions
    max_length = spec.max_length or fixed or min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    if fixed is not None and (max_length != fixed or spec.padding != "max_length"):
        raise _refuse(
            f"the model takes sequences of exactly {fixed} tokens: use max_length {fixed} (or leave it "
            "unset) with padding max_length"
        )
    if limit is not None and max_length > limit:
        raise InvalidDatasetError(
            f"max_length {max_length} is over the {limit} positions of the model's position table: "
            f"longer rows would index past it; ask for max_length {limit} or less",
            code="sequence_too_long",
            extra={"max_length": max_length, "max_positions": limit},
        )
    common = set(dtypes.values())
    resolved = replace(
        spec, input_names=names, max_length=max_length, dtype=common.pop() if len(common) == 1 else None
    )
    return resolved, dtypes


# ---------------------------------------------------------------- the tokenizer


def check_vocabulary(vocab_size: int, model: TextModel, names: Mapping[str, str]) -> None:
    """A tokenizer whose ids reach past the model's word-embedding table is the wrong one."""
    name = names["input_ids"]
    rows = model.embedding_rows.get(name)
    if rows is not None and vocab_size > rows:
        raise InvalidDatasetError(
            f"the tokenizer's vocabulary has {vocab_size} tokens, but the model's embedding table read "
            f"by '{name}' has {rows} rows: ids {rows} and above would index past it. Upload the "
            "tokenizer the model was trained with",
            code="vocab_exceeds_embedding",
            extra={"vocab_size": vocab_size, "embedding_rows": rows, "input_name": name},
        )


def check_type_ids(max_type_id: int, embedding_rows: Mapping[str, int], names: Mapping[str, str]) -> None:
    """Type ids past the model's token-type table (1 for a second text, where RoBERTa has one row)."""
    name = names.get("token_type_ids")
    rows = None if name is None else embedding_rows.get(name)
    if rows is not None and max_type_id >= rows:
        raise InvalidDatasetError(
            f"the texts give type id {max_type_id}, but the model's token-type table read by '{name}' "
            f"has {rows} row(s): this model takes no text_pair",
            code="type_ids_exceed_embedding",
            extra={"type_id": max_type_id, "embedding_rows": rows, "input_name": name},
        )


def check_text_fits(text: Mapping[str, Any], embedding_rows: Mapping[str, int]) -> None:
    """A stored text dataset (`describe()`) against a model's embedding tables: what a job checks
    when it uses a dataset that was made for another model, or for none."""
    names = dict(text["tokenization"]["input_names"])
    check_vocabulary(int(text["vocab_size"]), TextModel((), embedding_rows), names)
    check_type_ids(int(text.get("max_type_id", 0)), embedding_rows, names)


# ---------------------------------------------------------------- the plan and the arrays


@dataclass(frozen=True)
class TextPlan:
    """What a text dataset will become, known before a line is tokenized: the resolved spec, the
    arrays (name, dtype), the lines and labels, and the bytes of the arrays, checked."""

    spec: TextTokenization  # resolved: max_length and input_names set
    dtypes: dict[str, str]  # array (role) -> dtype
    lines: TextLines
    vocab_size: int
    pads: PadIds
    model: TextModel | None

    @property
    def samples(self) -> int:
        return self.lines.samples

    @property
    def names(self) -> dict[str, str]:
        return self.spec.names

    @property
    def nbytes(self) -> int:
        """The arrays at max_length (padding `longest` makes them this size at most)."""
        length = cast(int, self.spec.max_length)
        return sum(self.samples * length * np.dtype(dtype).itemsize for dtype in self.dtypes.values())

    def info(self) -> DatasetInfo:
        """The dataset's description before it is tokenized (what a `processing` dataset shows;
        with padding `longest`, its rows are at most this long)."""
        labels = self.lines.labels
        return DatasetInfo(
            samples=self.samples,
            arrays={
                self.names[role]: ArraySpec((self.samples, cast(int, self.spec.max_length)), dtype)
                for role, dtype in self.dtypes.items()
            },
            has_labels=labels is not None,
            classes=None if labels is None else len(np.unique(labels)),
        )


def plan_text_dataset(
    jsonl_path: Path,
    tokenizer: TokenizerProcess,
    spec: TextTokenization,
    *,
    limits: DatasetLimits,
    text_limits: TextLimits | None = None,
    model: TextModel | None = None,
    classes: Sequence[str] | None = None,
    max_bytes: int | None = None,
) -> TextPlan:
    """Everything checked before a line is tokenized: the spec against the model (input names,
    dtypes, a fixed sequence length), every line (JSON, text, label; their number) while the
    tokenizer loads in its process, then the tokenizer (its refusal) and its vocabulary against the
    model's embedding table, then the arrays' bytes against `limits.max_bytes` (and `max_bytes`,
    e.g. the server's unpacked-size limit)."""
    text_limits = text_limits or TextLimits()
    resolved, dtypes = resolve(spec, model)
    lines = scan_lines(jsonl_path, max_line_bytes=text_limits.max_line_bytes, limits=limits, classes=classes)
    facts = tokenizer.facts()
    if model is not None:
        check_vocabulary(facts.vocab_size, model, resolved.names)
    plan = TextPlan(resolved, dtypes, lines, facts.vocab_size, facts.pads, model)
    bounded = limits if max_bytes is None else replace(limits, max_bytes=min(limits.max_bytes, max_bytes))
    bounded.check_bytes(
        plan.nbytes,
        f"{plan.samples} lines of {resolved.max_length} tokens in {len(dtypes)} arrays",
        "upload fewer lines per dataset, or a smaller max_length",
    )
    return plan


def write_text_npz(
    jsonl_path: Path,
    tokenizer: TokenizerProcess,
    plan: TextPlan,
    npz_path: Path,
    *,
    max_line_bytes: int,
    progress: ProgressFn | None = None,
    each_chunk: bool = False,
) -> TextResult:
    """Tokenize the lines into `npz_path` (uncompressed, one array per model input plus `labels`),
    through `.npy` files beside it that the tokenizer's process fills (`each_chunk`: its deadline is
    per chunk of lines, for a job); raise what tokenizing raises (naming the line), leaving no file
    behind."""
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    length = cast(int, plan.spec.max_length)
    rows_paths = {role: npz_path.with_name(f"{npz_path.stem}.{role}.rows.npy") for role in plan.dtypes}
    try:
        files: dict[str, RowsFile] = {}
        for role, path in rows_paths.items():  # made at full size; the child writes the rows
            made = np.lib.format.open_memmap(
                path, mode="w+", dtype=plan.dtypes[role], shape=(plan.samples, length)
            )
            files[role] = RowsFile(str(path), int(made.offset), plan.dtypes[role])
            del made
        request = RowsRequest(
            jsonl=str(jsonl_path),
            files=files,
            samples=plan.samples,
            max_length=length,
            truncation=plan.spec.truncation,
            padding=plan.spec.padding,
            padding_side=plan.spec.padding_side,
            add_special_tokens=plan.spec.add_special_tokens,
            pads=plan.pads,
            max_line_bytes=max_line_bytes,
        )
        result = tokenizer.fill_rows(request, progress=progress, each_chunk=each_chunk)
        if plan.model is not None:
            check_type_ids(result.max_type_id, plan.model.embedding_rows, plan.names)
        arrays = {role: np.load(path, mmap_mode="r", allow_pickle=False) for role, path in rows_paths.items()}
        try:
            _write_npz(npz_path, plan, arrays, result.sequence_length)
        finally:
            arrays.clear()  # the maps closed before their files are removed
        return result
    except BaseException:
        npz_path.unlink(missing_ok=True)
        raise
    finally:
        for path in rows_paths.values():
            path.unlink(missing_ok=True)


def _write_npz(npz_path: Path, plan: TextPlan, arrays: dict[str, np.ndarray], sequence_length: int) -> None:
    """The arrays (cut to `sequence_length` columns for padding `longest`) and labels, stored
    uncompressed as numpy.savez writes them, a buffer at a time."""
    length = cast(int, plan.spec.max_length)
    columns = (
        slice(length - sequence_length, length)
        if plan.spec.padding_side == "left"
        else slice(0, sequence_length)
    )
    with zipfile.ZipFile(npz_path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for role, name in plan.spec.input_names or ():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arrays[role][:, columns], allow_pickle=False)
        if plan.lines.labels is not None:
            with archive.open(f"{LABELS_KEY}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, plan.lines.labels, allow_pickle=False)


def describe(
    plan: TextPlan, result: TextResult | None = None, *, tokenizer_sha256: str | None = None
) -> dict[str, Any]:
    """What to store with the dataset and show beside its DatasetInfo (`text`); before it is
    tokenized (`result` None), what tokenizing finds is null."""
    return {
        "format": "jsonl",
        "lines": plan.samples,
        "tokenization": plan.spec.to_dict(),
        "dtypes": {plan.names[role]: dtype for role, dtype in plan.dtypes.items()},
        "sequence_length": None if result is None else result.sequence_length,
        "truncated_lines": None if result is None else result.truncated,
        "text_pairs": plan.lines.pairs,
        "vocab_size": plan.vocab_size,
        "max_type_id": None if result is None else result.max_type_id,
        "pad_id": plan.pads.pad_id,
        "pad_token": plan.pads.pad_token,
        "class_names": None if plan.lines.class_names is None else list(plan.lines.class_names),
        "tokenizer_sha256": tokenizer_sha256,
        "model_id": None if plan.model is None else plan.model.model_id,
        "embedding_rows": None if plan.model is None else dict(plan.model.embedding_rows),
    }


# ---------------------------------------------------------------- a dataset, end to end


def prepare_text_dataset(
    jsonl_path: Path,
    tokenizer: TokenizerProcess,
    spec: Mapping[str, Any] | None,
    *,
    limits: DatasetLimits,
    text_limits: TextLimits,
    model: TextModel | None = None,
    classes: Sequence[str] | None = None,
    max_bytes: int | None = None,
) -> TextPlan:
    """The plan of a text dataset, from a stored or uploaded spec, with its tokenizer (open_tokenizer):
    everything checked before a line is tokenized (the spec, the tokenizer, the model's names and
    tables, every line, the bytes)."""
    return plan_text_dataset(
        jsonl_path,
        tokenizer,
        TextTokenization.from_dict(spec or {}),
        limits=limits,
        text_limits=text_limits,
        model=model,
        classes=classes,
        max_bytes=max_bytes,
    )


def write_text_dataset(
    jsonl_path: Path,
    tokenizer: TokenizerProcess,
    plan: TextPlan,
    npz_path: Path,
    *,
    limits: DatasetLimits,
    text_limits: TextLimits,
    max_unpacked_bytes: int,
    tokenizer_sha256: str | None = None,
    progress: ProgressFn | None = None,
    each_chunk: bool = False,
) -> dict[str, Any]:
    """Tokenize the planned lines into `npz_path` (write_text_npz), check the arrays as any uploaded
    `.npz` is checked and, for a model, against its inputs (names, dtypes, shapes:
    `dataset_mismatch`, as a job would say). Returns the dataset's info with `text`
    (engines.ingest.texts.describe)."""
    result = write_text_npz(
        jsonl_path,
        tokenizer,
        plan,
        npz_path,
        max_line_bytes=text_limits.max_line_bytes,
        progress=progress,
        each_chunk=each_chunk,
    )
    info = inspect_npz(npz_path, max_unpacked_bytes=max_unpacked_bytes, limits=limits)
    if plan.model is not None:
        try:
            check_fits_model(info, plan.model.inputs)
        except DatasetMismatchError as exc:
            npz_path.unlink(missing_ok=True)
            raise InvalidDatasetError(exc.detail, code=exc.code, extra=exc.extra) from exc
    return {**info.to_dict(), "text": describe(plan, result, tokenizer_sha256=tokenizer_sha256)}
