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
before any text is tokenized). Memory is one chunk of lines and their encodings: the arrays are
written into memory-mapped `.npy` files, then into the `.npz`, as engines.ingest.image_npz writes
images; nothing is left behind on error.

Refusals raise InvalidDatasetError with a code; those about one line carry `line` (1-based, blank
lines counted; engines.ingest.text_lines reads and checks the lines): `invalid_json_line` (not
UTF-8, not JSON, not an object), `missing_text` (no text, or not a non-empty string),
`invalid_text` (a text or text_pair that is not a string of Unicode characters), `invalid_label`,
`line_too_long`, `text_too_long` (more tokens than max_length: with truncation off, or special
tokens alone over it), `tokenization_failed` (the tokenizer raised on it). Others:
`invalid_tokenizer`, `tokenizer_too_large`, `invalid_tokenization` (the spec), `unknown_input_name`
(a name the model has not), `input_names_required` (no model input is input_ids),
`sequence_too_long` (max_length over the model's position table), `vocab_exceeds_embedding`,
`type_ids_exceed_embedding`, `too_many_samples`, `dataset_too_large`, `invalid_dataset`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np

from engines.errors import DatasetMismatchError, InvalidDatasetError
from engines.ingest.datasets import LABELS_KEY, ArraySpec, DatasetInfo, check_fits_model, inspect_npz
from engines.ingest.limits import DatasetLimits
from engines.ingest.signature import TensorSpec
from engines.ingest.spec_fields import spec_values
from engines.ingest.text_lines import TextLine, TextLines, iter_lines, line_error, scan_lines

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
#: Tokens a tokenizer's padding section may name; the first in its vocabulary pads (else id 0).
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|padding|>", "<PAD>")
#: Lines tokenized at once: memory is a chunk of texts and their encodings.
CHUNK_LINES = 512
CHUNK_BYTES = 8 * 1024 * 1024

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class TextLimits:
    """Bounds of a text upload beside DatasetLimits (whose max_samples bounds its lines)."""

    max_line_bytes: int = 1024 * 1024
    max_tokenizer_bytes: int = 64 * 1024 * 1024

    def check_tokenizer_bytes(self, nbytes: int) -> None:
        if nbytes > self.max_tokenizer_bytes:
            raise InvalidDatasetError(
                f"tokenizer.json is {nbytes} bytes, over the limit of {self.max_tokenizer_bytes}",
                code="tokenizer_too_large",
                extra={"bytes": nbytes, "limit": self.max_tokenizer_bytes},
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


def _reraise_fatal(exc: BaseException) -> None:
    """The Rust library raises Exception with its message, and on a panic pyo3's PanicException,
    a BaseException: a user's tokenizer.json can reach either, so both are caught as BaseException;
    this lets through what is not the library's failure (an interrupt, running out of memory)."""
    if isinstance(exc, KeyboardInterrupt | SystemExit | MemoryError | GeneratorExit):
        raise exc


def load_tokenizer(path: Path, limits: TextLimits | None = None) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json, size-checked before it is read; one that
    does not load is `invalid_tokenizer` with the library's reason."""
    from tokenizers import Tokenizer

    limits = limits or TextLimits()
    limits.check_tokenizer_bytes(path.stat().st_size)
    try:
        text = path.read_bytes().decode("utf-8")
        tokenizer = Tokenizer.from_str(text)
    except BaseException as exc:  # UnicodeDecodeError, the library's Exception with serde's message
        _reraise_fatal(exc)
        raise InvalidDatasetError(
            f"tokenizer.json could not be loaded by the tokenizers library ({exc}): upload the "
            "tokenizer.json a Hugging Face fast tokenizer saves (tokenizer.save_pretrained)",
            code="invalid_tokenizer",
        ) from exc
    if tokenizer.get_vocab_size(with_added_tokens=True) < 1:
        raise InvalidDatasetError("tokenizer.json has an empty vocabulary", code="invalid_tokenizer")
    return tokenizer


@dataclass(frozen=True)
class PadIds:
    pad_id: int
    pad_type_id: int
    pad_token: str | None


def pad_ids(tokenizer: Any) -> PadIds:
    """What pads: the tokenizer's own padding section, else the first of PAD_TOKENS it knows, else
    id 0 (the attention mask hides pads; a tokenizer without a pad token, such as GPT-2's, is
    padded with id 0 by the usual recipes too)."""
    padding = tokenizer.padding
    if padding:
        return PadIds(int(padding["pad_id"]), int(padding.get("pad_type_id", 0)), padding.get("pad_token"))
    for token in PAD_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return PadIds(int(token_id), 0, token)
    return PadIds(0, 0, None)


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
    tokenizer: Any,
    spec: TextTokenization,
    *,
    limits: DatasetLimits,
    text_limits: TextLimits | None = None,
    model: TextModel | None = None,
    classes: Sequence[str] | None = None,
    max_bytes: int | None = None,
) -> TextPlan:
    """Everything checked before a line is tokenized, cheapest first: the spec against the model
    (input names, dtypes, a fixed sequence length), the vocabulary against its embedding table,
    then every line (JSON, text, label; their number), then the arrays' bytes against
    `limits.max_bytes` (and `max_bytes`, e.g. the server's unpacked-size limit)."""
    text_limits = text_limits or TextLimits()
    resolved, dtypes = resolve(spec, model)
    vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    if model is not None:
        check_vocabulary(vocab_size, model, resolved.names)
    lines = scan_lines(jsonl_path, max_line_bytes=text_limits.max_line_bytes, limits=limits, classes=classes)
    plan = TextPlan(resolved, dtypes, lines, vocab_size, pad_ids(tokenizer), model)
    bounded = limits if max_bytes is None else replace(limits, max_bytes=min(limits.max_bytes, max_bytes))
    bounded.check_bytes(
        plan.nbytes,
        f"{plan.samples} lines of {resolved.max_length} tokens in {len(dtypes)} arrays",
        "upload fewer lines per dataset, or a smaller max_length",
    )
    return plan


@dataclass(frozen=True)
class TextResult:
    """What tokenizing found: the arrays' sequence length, lines cut by truncation, the largest
    type id (checked against the model's token-type table)."""

    sequence_length: int
    truncated: int
    max_type_id: int


def write_text_npz(
    jsonl_path: Path,
    tokenizer: Any,
    plan: TextPlan,
    npz_path: Path,
    *,
    max_line_bytes: int,
    progress: ProgressFn | None = None,
) -> TextResult:
    """Tokenize the lines into `npz_path` (uncompressed, one array per model input plus `labels`),
    through memory-mapped `.npy` files beside it; raise what tokenizing raises (naming the line),
    leaving no file behind."""
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    length = cast(int, plan.spec.max_length)
    rows_paths = {role: npz_path.with_name(f"{npz_path.stem}.{role}.rows.npy") for role in plan.dtypes}
    try:
        arrays = {
            role: np.lib.format.open_memmap(
                path, mode="w+", dtype=plan.dtypes[role], shape=(plan.samples, length)
            )
            for role, path in rows_paths.items()
        }
        try:
            result = _tokenize_into(jsonl_path, tokenizer, plan, arrays, max_line_bytes, progress)
            if plan.model is not None:
                check_type_ids(result.max_type_id, plan.model.embedding_rows, plan.names)
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


def _configure(tokenizer: Any, spec: TextTokenization) -> None:
    """Truncation as the spec says; no padding (rows are padded here, to the spec's length)."""
    tokenizer.no_padding()
    if spec.truncation:
        tokenizer.enable_truncation(cast(int, spec.max_length), strategy="longest_first", direction="right")
    else:
        tokenizer.no_truncation()


def _chunks(jsonl_path: Path, max_line_bytes: int) -> Iterator[list[TextLine]]:
    chunk: list[TextLine] = []
    size = 0
    for entry in iter_lines(jsonl_path, max_line_bytes):
        chunk.append(entry)
        size += len(entry.text) + len(entry.pair or "")
        if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode(tokenizer: Any, chunk: list[TextLine], add_special_tokens: bool) -> list[Any]:
    """The chunk's encodings; `encode_batch_fast` (tokenizers 0.20+) skips the character offsets,
    which no array needs (a third of the time)."""
    inputs = [entry.text if entry.pair is None else (entry.text, entry.pair) for entry in chunk]
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    try:
        return cast(list[Any], encode_batch(inputs, add_special_tokens=add_special_tokens))
    except BaseException as batch_error:  # find the line: encode them one by one
        _reraise_fatal(batch_error)
        for entry, item in zip(chunk, inputs, strict=True):
            try:
                tokenizer.encode(
                    *((item,) if isinstance(item, str) else item), add_special_tokens=add_special_tokens
                )
            except BaseException as exc:
                _reraise_fatal(exc)
                raise line_error(
                    entry.line, f"the tokenizer failed on it: {exc}", "tokenization_failed"
                ) from exc
        raise InvalidDatasetError("the tokenizer failed on these lines", code="tokenization_failed") from None


def _tokenize_into(
    jsonl_path: Path,
    tokenizer: Any,
    plan: TextPlan,
    arrays: dict[str, np.ndarray],
    max_line_bytes: int,
    progress: ProgressFn | None,
) -> TextResult:
    spec, pads = plan.spec, plan.pads
    length = cast(int, spec.max_length)
    fill = {"input_ids": pads.pad_id, "attention_mask": 0, "token_type_ids": pads.pad_type_id}
    left = spec.padding_side == "left"
    _configure(tokenizer, spec)
    row = longest = truncated = max_type = 0
    for chunk in _chunks(jsonl_path, max_line_bytes):
        encodings = _encode(tokenizer, chunk, spec.add_special_tokens)
        blocks = {
            role: np.full((len(chunk), length), fill[role], dtype=arrays[role].dtype) for role in arrays
        }
        for i, (entry, encoding) in enumerate(zip(chunk, encodings, strict=True)):
            values = {
                "input_ids": encoding.ids,
                "attention_mask": encoding.attention_mask,
                "token_type_ids": encoding.type_ids,
            }
            count = len(encoding.ids)
            if count > length:
                why = (
                    "with truncation off, a line must fit"
                    if not spec.truncation
                    else "the special tokens alone are more than max_length"
                )
                raise InvalidDatasetError(
                    f"line {entry.line}: the text makes {count} tokens, over max_length {length} ({why}): "
                    "raise max_length" + ("" if spec.truncation else ", or turn truncation on"),
                    code="text_too_long",
                    extra={"line": entry.line, "tokens": count, "max_length": length},
                )
            truncated += bool(encoding.overflowing)
            longest = max(longest, count)
            if encoding.type_ids:
                max_type = max(max_type, max(encoding.type_ids))
            cells = slice(length - count, length) if left else slice(0, count)
            for role, block in blocks.items():
                block[i, cells] = values[role]
        for role, block in blocks.items():
            arrays[role][row : row + len(chunk)] = block
        row += len(chunk)
        if progress is not None:
            progress(row, plan.samples)
    sequence_length = longest if spec.padding == "longest" else length
    return TextResult(max(sequence_length, 1), truncated, max_type)


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
    tokenizer_path: Path,
    spec: Mapping[str, Any] | None,
    *,
    limits: DatasetLimits,
    text_limits: TextLimits,
    model: TextModel | None = None,
    classes: Sequence[str] | None = None,
    max_bytes: int | None = None,
) -> tuple[TextPlan, Any]:
    """The plan of a text dataset and its loaded tokenizer: everything checked before a line is
    tokenized (the spec, the tokenizer, the model's names and tables, every line, the bytes)."""
    tokenizer = load_tokenizer(tokenizer_path, text_limits)
    plan = plan_text_dataset(
        jsonl_path,
        tokenizer,
        TextTokenization.from_dict(spec or {}),
        limits=limits,
        text_limits=text_limits,
        model=model,
        classes=classes,
        max_bytes=max_bytes,
    )
    return plan, tokenizer


def write_text_dataset(
    jsonl_path: Path,
    tokenizer: Any,
    plan: TextPlan,
    npz_path: Path,
    *,
    limits: DatasetLimits,
    text_limits: TextLimits,
    max_unpacked_bytes: int,
    tokenizer_sha256: str | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Tokenize the planned lines into `npz_path`, check the arrays as any uploaded `.npz` is
    checked and, for a model, against its inputs (names, dtypes, shapes: `dataset_mismatch`, as a
    job would say). Returns the dataset's info with `text` (engines.ingest.texts.describe)."""
    result = write_text_npz(
        jsonl_path, tokenizer, plan, npz_path, max_line_bytes=text_limits.max_line_bytes, progress=progress
    )
    info = inspect_npz(npz_path, max_unpacked_bytes=max_unpacked_bytes, limits=limits)
    if plan.model is not None:
        try:
            check_fits_model(info, plan.model.inputs)
        except DatasetMismatchError as exc:
            npz_path.unlink(missing_ok=True)
            raise InvalidDatasetError(exc.detail, code=exc.code, extra=exc.extra) from exc
    return {**info.to_dict(), "text": describe(plan, result, tokenizer_sha256=tokenizer_sha256)}
