"""Text datasets: a JSONL of texts and its tokenizer.json tokenized into a dataset's arrays
(engines.ingest.texts), for a model or for none (what a job checks of it later:
app.services.text_checks).

Every line, the tokenizer and the model's names and tables are checked at upload, whatever the
size (a bad line is a 422 that names it). A short JSONL (`text_inline_max_lines`) is then
tokenized at once; a longer one is stored as it came, with the tokenization the upload resolved,
for a `tokenize_texts` job (workers.handlers.run_tokenize_texts), as a large image folder is.
Everything is written in the upload's scratch folder and stored only when all of it passed
(app.api.uploads.commit_upload), so a refusal leaves nothing behind. The tokenizer is loaded and
run in a bounded child process (engines.ingest.bounded_tokenize: a deadline, a memory cap), never
in the API process: a tokenizer.json can make the library take unbounded time.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.orm import Session

from app.core.dataset_limits import text_limits
from app.core.orm import DatasetRecord
from app.core.settings import Settings
from app.core.store import ArtifactStore
from app.services.jobs import model_sequence, require_ready
from app.services.records import get_model_record
from app.services.text_checks import model_embedding_rows
from engines.errors import InvalidDatasetError
from engines.ingest.limits import DatasetLimits
from engines.ingest.signature import specs_from_dicts
from engines.ingest.texts import (
    TOKENIZER_FILENAME,
    TextLimits,
    TextModel,
    describe,
    open_tokenizer,
    prepare_text_dataset,
    write_text_dataset,
)

#: Codes of a text upload over a size bound (413, beside engines.ingest.limits.TOO_LARGE_CODES);
#: `tokenizer_too_slow` and `tokenizer_out_of_memory` (the tokenizer's process) are 422s.
TEXT_TOO_LARGE_CODES = frozenset({"tokenizer_too_large"})
_CHUNK = 1024 * 1024


def text_model(session: Session, store: ArtifactStore, project_id: str, model_id: str) -> TextModel:
    """The model a text dataset is uploaded for (404 in another project, 409 while not ready)."""
    model = get_model_record(session, model_id, project_id)
    require_ready(session, model)
    inputs = specs_from_dicts(model.info["inputs"])
    return TextModel(
        inputs=tuple(inputs),
        embedding_rows=model_embedding_rows(store, model),
        model_id=model.id,
        max_positions=model_sequence(store, model, inputs).max_positions,
    )


def save_tokenizer(stream: BinaryIO, target: Path, limits: TextLimits) -> str:
    """Copy the uploaded tokenizer.json to `target`, refusing it as soon as it is over the limit;
    returns its sha256."""
    digest = hashlib.sha256()
    size = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        while chunk := stream.read(_CHUNK):
            size += len(chunk)
            limits.check_tokenizer_bytes(size)
            digest.update(chunk)
            out.write(chunk)
    if size == 0:
        raise InvalidDatasetError("tokenizer.json is empty", code="invalid_tokenizer")
    return digest.hexdigest()


@dataclass(frozen=True)
class TextUpload:
    """A checked text upload: the dataset's info, and the options of its tokenize_texts job when
    it is tokenized later (None: its arrays are stored now)."""

    info: dict[str, Any]
    job_options: dict[str, Any] | None


def receive_texts(
    jsonl_path: Path,
    tokenizer_path: Path,
    npz_path: Path,
    *,
    settings: Settings,
    limits: DatasetLimits,
    spec: dict[str, Any] | None,
    classes: list[str] | None,
    model: TextModel | None,
    tokenizer_sha256: str,
) -> TextUpload:
    """Check everything (engines.ingest.texts.prepare_text_dataset), then tokenize into
    `npz_path` now (the tokenizer's process given `tokenize_timeout_s` to load, and as long to
    tokenize), or leave the JSONL at `DatasetRecord.TEXT_SOURCE_FILE` in `npz_path`'s folder for a
    job; the tokenizer is kept beside the arrays either way."""
    bounds = text_limits(settings)
    with open_tokenizer(tokenizer_path, bounds) as tokenizer:
        plan = prepare_text_dataset(
            jsonl_path,
            tokenizer,
            spec,
            limits=limits,
            text_limits=bounds,
            model=model,
            classes=classes,
            max_bytes=settings.max_unpacked_bytes,
        )
        folder = npz_path.parent
        shutil.copyfile(tokenizer_path, folder / TOKENIZER_FILENAME)
        if plan.samples <= settings.text_inline_max_lines:
            info = write_text_dataset(
                jsonl_path,
                tokenizer,
                plan,
                npz_path,
                limits=limits,
                text_limits=bounds,
                max_unpacked_bytes=settings.max_unpacked_bytes,
                tokenizer_sha256=tokenizer_sha256,
            )
            return TextUpload(info, None)
    source = folder / DatasetRecord.TEXT_SOURCE_FILE
    source.parent.mkdir(parents=True)
    shutil.move(jsonl_path, source)
    options = {
        "tokenization": plan.spec.to_dict(),  # as resolved here: the job applies exactly this
        "classes": None if plan.lines.class_names is None else list(plan.lines.class_names),
        "model": None if model is None else model.to_dict(),
        "tokenizer_sha256": tokenizer_sha256,
    }
    info = {**plan.info().to_dict(), "text": describe(plan, tokenizer_sha256=tokenizer_sha256)}
    return TextUpload(info, options)
