"""What a job checks of a text dataset against the model it runs on, beyond its arrays' names and
shapes (engines.ingest.datasets.check_fits_model): the tokenizer's vocabulary and type ids against
the model's embedding tables (engines.ingest.texts.check_text_fits). Kept apart from the upload
(app.services.text_datasets) so that app.services.jobs can call it without an import cycle."""

from __future__ import annotations

from typing import Any

from app.core.orm import ModelRecord
from app.core.store import ArtifactStore
from engines.ingest.embeddings import read_embedding_rows
from engines.ingest.model import MODEL_FILENAME
from engines.ingest.texts import check_text_fits


def model_embedding_rows(store: ArtifactStore, model: ModelRecord) -> dict[str, int]:
    """Input name -> rows of the embedding table it indexes (engines.ingest.embeddings): from the
    model's record when its upload recorded them (`info["embedding_rows"]`), else from its graph
    (weights not loaded)."""
    recorded = model.info.get("embedding_rows")
    if isinstance(recorded, dict):
        return {str(name): int(rows) for name, rows in recorded.items()}
    return read_embedding_rows(store.local_path(f"{model.artifact_prefix}/{MODEL_FILENAME}"))


def check_text_dataset(store: ArtifactStore, model: ModelRecord, dataset_info: dict[str, Any]) -> None:
    """InvalidDatasetError (`vocab_exceeds_embedding`, `type_ids_exceed_embedding`) when a text
    dataset's ids reach past the model's tables. Nothing to do for other datasets, or for the model
    the dataset was made for (checked at its upload)."""
    text = dataset_info.get("text")
    if not isinstance(text, dict) or text.get("model_id") == model.id:
        return
    check_text_fits(text, model_embedding_rows(store, model))
