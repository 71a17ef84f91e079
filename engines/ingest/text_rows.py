"""The tokenizer's side of a text dataset: a tokenizer.json loaded, and the lines of a JSONL
tokenized into the rows of the dataset's arrays.

This is what runs inside the bounded child process (engines.ingest.bounded_tokenize), never in
the API or a worker: a user's tokenizer.json can make the `tokenizers` library take unbounded time
or memory, in Rust code Python cannot interrupt. The rows go into `.npy` files the parent made at
their full size (engines.ingest.texts.write_text_npz), each chunk of rows written at its offset,
so only small JSON messages cross between the processes: the request (RowsRequest), progress,
and the result (TextResult) or a refusal.

Refusals: `invalid_tokenizer` (the library does not load it, or its vocabulary is empty),
`tokenizer_too_large` (its bytes), `tokenization_failed` (the library raised on a line, named),
`text_too_long` (a line over max_length with truncation off, or special tokens alone over it), and
the refusals of the lines themselves (engines.ingest.text_lines).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from engines.errors import InvalidDatasetError
from engines.ingest.text_lines import TextLine, iter_lines, line_error

#: Tokens a tokenizer's padding section may name; the first in its vocabulary pads (else id 0).
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|padding|>", "<PAD>")
#: Lines tokenized at once: memory is a chunk of texts and their encodings (and a job's deadline
#: is per chunk: engines.ingest.bounded_tokenize).
CHUNK_LINES = 512
CHUNK_BYTES = 8 * 1024 * 1024

ProgressFn = Callable[[int, int], None]


def check_tokenizer_bytes(nbytes: int, limit: int) -> None:
    """`tokenizer_too_large` (a 413) for a tokenizer.json over `limit` bytes."""
    if nbytes > limit:
        raise InvalidDatasetError(
            f"tokenizer.json is {nbytes} bytes, over the limit of {limit}",
            code="tokenizer_too_large",
            extra={"bytes": nbytes, "limit": limit},
        )


def _reraise_fatal(exc: BaseException) -> None:
    """The Rust library raises Exception with its message, and on a panic pyo3's PanicException,
    a BaseException: a user's tokenizer.json can reach either, so both are caught as BaseException;
    this lets through what is not the library's failure (an interrupt, running out of memory)."""
    if isinstance(exc, KeyboardInterrupt | SystemExit | MemoryError | GeneratorExit):
        raise exc


def load_tokenizer(path: Path, max_bytes: int) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json, size-checked before it is read; one that
    does not load is `invalid_tokenizer` with the library's reason."""
    from tokenizers import Tokenizer

    check_tokenizer_bytes(path.stat().st_size, max_bytes)
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


@dataclass(frozen=True)
class TokenizerFacts:
    """What planning a dataset needs of its tokenizer, read once it is loaded."""

    vocab_size: int
    pads: PadIds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenizerFacts:
        return cls(int(data["vocab_size"]), PadIds(**data["pads"]))


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


def tokenizer_facts(tokenizer: Any) -> TokenizerFacts:
    return TokenizerFacts(int(tokenizer.get_vocab_size(with_added_tokens=True)), pad_ids(tokenizer))


@dataclass(frozen=True)
class RowsFile:
    """One array's `.npy` file, made at its full size: rows are written from `offset` on."""

    path: str
    offset: int
    dtype: str


@dataclass(frozen=True)
class RowsRequest:
    """What to tokenize and how: the resolved spec's fields, the pads, the files of the arrays."""

    jsonl: str
    files: dict[str, RowsFile]  # role (input_ids, attention_mask, token_type_ids) -> its file
    samples: int
    max_length: int
    truncation: bool
    padding: str
    padding_side: str
    add_special_tokens: bool
    pads: PadIds
    max_line_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RowsRequest:
        values = dict(data)
        values["files"] = {role: RowsFile(**file) for role, file in data["files"].items()}
        values["pads"] = PadIds(**data["pads"])
        return cls(**values)


@dataclass(frozen=True)
class TextResult:
    """What tokenizing found: the arrays' sequence length, lines cut by truncation, the largest
    type id (checked against the model's token-type table)."""

    sequence_length: int
    truncated: int
    max_type_id: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _configure(tokenizer: Any, request: RowsRequest) -> None:
    """Truncation as the spec says; no padding (rows are padded here, to the spec's length): what
    the tokenizer.json says of either is not used."""
    tokenizer.no_padding()
    if request.truncation:
        tokenizer.enable_truncation(request.max_length, strategy="longest_first", direction="right")
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


def _write_at(fd: int, block: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(block)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def fill_rows(tokenizer: Any, request: RowsRequest, progress: ProgressFn | None = None) -> TextResult:
    """Tokenize the JSONL's lines (read again, each checked) into the request's files, a chunk at a
    time: each row padded to max_length on the spec's side, a line over it refused (`text_too_long`,
    naming it); `progress(rows done, samples)` after each chunk."""
    length = request.max_length
    pads = request.pads
    fill = {"input_ids": pads.pad_id, "attention_mask": 0, "token_type_ids": pads.pad_type_id}
    left = request.padding_side == "left"
    _configure(tokenizer, request)
    dtypes = {role: np.dtype(file.dtype) for role, file in request.files.items()}
    fds = {role: os.open(file.path, os.O_WRONLY) for role, file in request.files.items()}
    try:
        row = longest = truncated = max_type = 0
        for chunk in _chunks(Path(request.jsonl), request.max_line_bytes):
            if row + len(chunk) > request.samples:
                raise InvalidDatasetError(
                    "the file holds more lines than when it was checked; upload it again"
                )
            encodings = _encode(tokenizer, chunk, request.add_special_tokens)
            blocks = {
                role: np.full((len(chunk), length), fill[role], dtype=dtype) for role, dtype in dtypes.items()
            }
            for i, (entry, encoding) in enumerate(zip(chunk, encodings, strict=True)):
                count = len(encoding.ids)
                if count > length:
                    why = (
                        "with truncation off, a line must fit"
                        if not request.truncation
                        else "the special tokens alone are more than max_length"
                    )
                    raise InvalidDatasetError(
                        f"line {entry.line}: the text makes {count} tokens, over max_length {length} "
                        f"({why}): raise max_length"
                        + ("" if request.truncation else ", or turn truncation on"),
                        code="text_too_long",
                        extra={"line": entry.line, "tokens": count, "max_length": length},
                    )
                truncated += bool(encoding.overflowing)
                longest = max(longest, count)
                if encoding.type_ids:
                    max_type = max(max_type, max(encoding.type_ids))
                values = {
                    "input_ids": encoding.ids,
                    "attention_mask": encoding.attention_mask,
                    "token_type_ids": encoding.type_ids,
                }
                cells = slice(length - count, length) if left else slice(0, count)
                for role, block in blocks.items():
                    block[i, cells] = values[role]
            for role, block in blocks.items():
                _write_at(fds[role], block, request.files[role].offset + row * length * dtypes[role].itemsize)
            row += len(chunk)
            if progress is not None:
                progress(row, request.samples)
    finally:
        for fd in fds.values():
            os.close(fd)
    sequence_length = longest if request.padding == "longest" else length
    return TextResult(max(sequence_length, 1), truncated, max_type)
