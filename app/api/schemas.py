"""Request and response bodies. Request models map 1:1 onto the frozen configs in engines/."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Query

# The shortest auto-optimize time budget: the SDK holds it, so its CLI refuses a smaller
# --time-budget before uploading anything; the schema below enforces the same value.
from optiforge_client.limits import MIN_TIME_BUDGET_MINUTES
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.api.middleware.control_chars import TEXT_CONTROL_CHARACTERS
from app.core.orm import JobKind
from engines.backends.registry import backend_names
from engines.graphopt.config import AUTO, OFF, GraphOptConfig
from engines.graphopt.model_types import model_type_names
from engines.ingest.sequence import MAX_SEQUENCE_LENGTH
from engines.measure.latency import MeasureConfig
from engines.measure.tokens import MAX_PADDING
from engines.prune.criteria import CRITERIA
from engines.prune.finetune import FinetuneConfig
from engines.prune.methods import PruneConfig
from engines.qat.config import QatConfig
from engines.quantize.budget import BUDGET_METRICS, AccuracyBudget
from engines.quantize.dynamic import DEFAULT_OP_TYPES, DYNAMIC_OP_TYPES, DynamicConfig
from engines.quantize.int8 import CALIBRATION_METHODS, QuantizeConfig
from engines.quantize.weight_only import (
    ACCURACY_LEVELS,
    BLOCK_SIZES,
    WEIGHT_ONLY_ALGORITHMS,
    WeightOnlyConfig,
)
from engines.recipe import Recipe
from engines.search.autotune import AutotuneRequest
from engines.search.space import OBJECTIVE_METRICS, Budget, Objective, SearchSpace
from engines.variants import PRECISIONS

# Enums read from the registries of engines/, so the OpenAPI document, validation messages and
# GET /v1/capabilities (what the SDK's CLI checks against) can never disagree with what runs.
CalibrationName = Literal[tuple(CALIBRATION_METHODS)]  # type: ignore[valid-type]
BudgetMetric = Literal[BUDGET_METRICS]  # type: ignore[valid-type]
PruneCriterion = Literal[tuple(CRITERIA)]  # type: ignore[valid-type]
_SENSITIVITY_CRITERIA = tuple(name for name, item in CRITERIA.items() if item.in_sensitivity)
SensitivityCriterion = Literal[_SENSITIVITY_CRITERIA]  # type: ignore[valid-type]
Precision = Literal[tuple(PRECISIONS)]  # type: ignore[valid-type]
BackendName = Literal[tuple(backend_names())]  # type: ignore[valid-type]
ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


#: `?sha256=` of the model and dataset listings: the hex sha256 of an uploaded file.
Sha256Query = Annotated[
    str | None,
    Query(
        pattern=r"^[0-9A-Fa-f]{64}$",
        description="only records uploaded from a file with this sha256 (hex): ask before uploading",
    ),
]


#: `?force=true` of a delete that would otherwise be refused (an alias, a dataset in use).
ForceQuery = Annotated[
    bool,
    Query(
        description="delete even what is in use: an engine's alias goes with it; a dataset's queued or "
        "running jobs are cancelled"
    ),
]


#: The example of an optional multipart form field: empty. Swagger UI's "Try it out" fills each
#: form field with a sample of its schema (a random string matching its pattern, "string", 0), which
#: it then sends: every optional field of POST /v1/datasets failed as given (preprocessing "string"
#: on an .npz). An empty field is read as left out (FastAPI takes "" in a form as the default).
FORM_UNSET = [""]


#: A display name (uploads): anything printable, no control characters.
NAME_PATTERN = r"^[^\x00-\x1f\x7f]*$"


def _text_pattern() -> str:
    """TEXT_CONTROL_CHARACTERS (one character class) turned into the pattern of text without them."""
    forbidden = TEXT_CONTROL_CHARACTERS.pattern
    if not (forbidden.startswith("[") and forbidden.endswith("]") and not forbidden.startswith("[^")):
        raise ValueError(f"TEXT_CONTROL_CHARACTERS must be one character class: {forbidden}")
    return f"^[^{forbidden[1:-1]}]*$"


#: Text in a request body (ids, names, options), as the OpenAPI document states it: no control
#: character but tab, newline and carriage return (the rule of `unstorable_text`, from the same
#: class), so a generated client or schemathesis does not send what is refused. Unpaired surrogates
#: are refused too but left out of the pattern: a JSON Schema validator without Unicode mode reads
#: UTF-16 code units, where every character beyond the BMP (an emoji) is a surrogate pair, and a
#: lone surrogate is no Unicode text, which JSON Schema strings are anyway.
TEXT_PATTERN = _text_pattern()
Text = Annotated[str, Field(pattern=TEXT_PATTERN)]
#: An object whose keys are client text (input names): the same rule, for its property names.
TEXT_KEYS = {"propertyNames": {"pattern": TEXT_PATTERN}}


def _whole_number(value: Any) -> Any:
    """1.0 as 1: JSON Schema's `integer` is any number without a fraction, so the document's
    integers take it (JSON has one number type; some clients write every number with a point).
    Anything else goes on to the strict check: `true` or `"8"` is still no integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


WHOLE_NUMBER = BeforeValidator(_whole_number)
#: An integer of a request body, as JSON Schema means it (`_whole_number`). Bounds given by the
#: field (`x: Integer = Field(1, ge=1)`) reach the document; inside a union or a list, give them
#: before WHOLE_NUMBER (`Annotated[int, Field(ge=1), WHOLE_NUMBER] | None`), or pydantic writes
#: them as `ge`/`le`, which JSON Schema does not read (tests/test_contract_bounds.py checks).
Integer = Annotated[int, WHOLE_NUMBER]

#: Ids start with these (app.core.orm.new_id): an alias that did would be read as an id.
ID_PREFIXES = ("eng_", "mdl_")


def _not_an_id(alias: str) -> str:
    if alias.startswith(ID_PREFIXES):
        raise ValueError(f"an alias cannot start with {' or '.join(ID_PREFIXES)}: names like that are ids")
    return alias


#: A name to infer with instead of an engine id. Checked as ALIAS_PATTERN plus `_not_an_id` (the
#: look-ahead is no pattern pydantic's regex engine takes); the document states both in one pattern.
Alias = Annotated[
    str,
    Field(
        pattern=ALIAS_PATTERN,
        json_schema_extra={"pattern": f"^(?!{'|'.join(ID_PREFIXES)}){ALIAS_PATTERN[1:]}"},
        description=f"letters, digits, '.', '_', '-'; not starting with {' or '.join(ID_PREFIXES)} "
        "(those are ids)",
    ),
    AfterValidator(_not_an_id),
]


#: An unpaired UTF-16 surrogate: `"\\ud800"` is a valid JSON escape, but no UTF-8 text holds it, and
#: UTF-8 is what both databases store and every JSON response is written in. Taken in, it was stored
#: (in a JSON column, which escapes it) and then broke every listing that showed it.
SURROGATES = re.compile("[\ud800-\udfff]")


def unstorable_text(value: str) -> str | None:
    """Why `value` cannot be taken in as an id, name or option (None: it can). The one rule for text
    in request bodies and form fields (`InputModel`, `InferRequest`'s names, `check_text`)."""
    if TEXT_CONTROL_CHARACTERS.search(value):
        return "control characters (such as NUL) are not allowed in ids, names or options"
    if SURROGATES.search(value):
        return (
            "unpaired UTF-16 surrogates (such as \\ud800) are not allowed: they are no Unicode "
            "characters and cannot be stored; send the text as proper UTF-8"
        )
    return None


class InputModel(BaseModel):
    """A request body: no string in it, key or value, at any depth, holds a control character
    (NUL above all: PostgreSQL refuses it; see app.api.middleware.control_chars) or an unpaired
    surrogate (`unstorable_text`), so nothing is stored that a response could not show. Strict: a
    value is taken as the OpenAPI document types it, not coerced (`true` is no batch size, `"8"` no
    integer; an integer is still a number), which schemathesis checks (tests/test_schemathesis.py)."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        check_text(data)
        return data


def check_text(value: Any) -> None:
    """ValueError when a string in `value` (keys and values, at any depth) is `unstorable_text`:
    for request bodies (through pydantic, a 422) and JSON sent in form fields. A loop, not
    recursion: JSON as deep as the parser takes must not exhaust the stack here."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if (reason := unstorable_text(item)) is not None:
                raise ValueError(reason)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)


class TensorSpecOut(BaseModel):
    name: str
    dtype: str
    shape: list[int | str | None] = Field(
        description="ints are static dims, strings symbolic, null dynamic (also for -1 or 0 in the file)"
    )
    batch_axis: int | None = Field(
        0,
        description="the dim samples stack along (recurrent state: often 1); null: none (a scalar, or a "
        "tensor every sample shares). A dataset holds one row per sample: the shape without this dim",
    )
    batch_axis_stated: bool | None = Field(
        None,
        exclude_if=lambda stated: stated is None,
        description="present (true) only when batch_axis was stated at upload (form field batch_axis)",
    )


ModelStatusName = Literal["ready", "converting", "failed"]


class ModelError(BaseModel):
    """Why a model's conversion failed: the convert job's error (`unsupported_op` adds `operators`)."""

    model_config = ConfigDict(extra="allow")

    code: str
    detail: str


class ModelOut(BaseModel):
    """A model. An ONNX upload is `ready` at once; a PyTorch program (`.pt2`) is `converting` until
    its convert job (`conversion_job_id`) ends, then `ready` or `failed` (with `error`). What only
    the ONNX model tells (opset, signature, parameters…) is null or empty until it is `ready`."""

    id: str
    name: str
    filename: str = Field(description="the uploaded file's name (.onnx, .zip or .pt2)")
    sha256: str = Field(description="of the uploaded file")
    deduplicated: bool = Field(
        False,
        description="true on an upload answered with this model: the project held the same file, "
        "uploaded with the same options; nothing new was stored",
    )
    size_bytes: int = Field(description="of the uploaded file")
    status: ModelStatusName = Field(
        "ready", description="ready: usable; converting: its convert job runs; failed: see `error`"
    )
    error: ModelError | None = Field(None, description="why the conversion failed (status failed)")
    conversion_job_id: str | None = Field(None, description="the convert job of a PyTorch upload")
    conversion: dict[str, Any] | None = Field(
        None,
        description="a converted model: the source format, the exporter, opset, dynamic dims and "
        "notes (what was dropped or not read)",
    )
    opset: int | None = None
    ir_version: int | None = None
    producer: str | None = None
    inputs: list[TensorSpecOut] = Field(default_factory=list)
    outputs: list[TensorSpecOut] = Field(default_factory=list)
    parameters: int | None = None
    macs: int | None = Field(None, description="multiply-accumulates per sample (Conv/Gemm/MatMul)")
    external_data: bool | None = None
    op_types: dict[str, int] = Field(default_factory=dict)
    warnings: list[str] = Field(
        default_factory=list, description="what is odd about the model but does not stop it running"
    )
    created_at: datetime


class ArrayOut(BaseModel):
    shape: list[int]
    dtype: str


class DatasetOut(BaseModel):
    id: str
    name: str
    filename: str
    sha256: str = Field(description="of the uploaded file")
    deduplicated: bool = Field(
        False,
        description="true on an upload answered with this dataset: the project held the same file, "
        "uploaded with the same options (preprocessing, classes, tokenizer, …); nothing new was stored",
    )
    size_bytes: int
    samples: int
    arrays: dict[str, ArrayOut]
    has_labels: bool
    classes: int | None
    uniform_arrays: list[str] = Field(
        default_factory=list,
        description="arrays whose rows are all equal: they can feed an input without a batch axis "
        "at any batch size",
    )
    image_folder: dict[str, Any] | None = Field(
        default=None,
        description="for a .zip of images: images, the preprocessing spec applied, class_names",
    )
    text: dict[str, Any] | None = Field(
        default=None,
        description="for a JSONL of texts: lines, the tokenization spec applied (input_names: array -> "
        "model input), dtypes, sequence_length, truncated_lines, vocab_size, pad_id, class_names, "
        "model_id (the model it was made for) and its embedding_rows",
    )
    status: Literal["ready", "processing", "failed"] = Field(
        default="ready",
        description="processing: a large image folder, or a long JSONL of texts, whose arrays its job "
        "(processing_job_id) is making; jobs can use the dataset once it is ready",
    )
    error: dict[str, Any] | None = Field(default=None, description="why decoding failed: code, detail")
    processing_job_id: str | None = Field(
        default=None,
        description="the job that makes its arrays: decode_images (a large image folder) or "
        "tokenize_texts (a long JSONL of texts)",
    )
    created_at: datetime


class MeasureIn(InputModel):
    model_config = ConfigDict(extra="forbid")

    warmup_runs: Integer = Field(10, ge=0, le=10_000)
    timed_runs: Integer = Field(
        50, ge=1, le=100_000, description="at least this many timed runs per batch size"
    )
    min_seconds: float = Field(1.0, ge=0, le=600, description="and at least this long timing each batch size")
    max_runs: Integer = Field(100_000, ge=1, le=1_000_000, description="but never more runs than this")
    threads: Annotated[int, Field(ge=1, le=1024), WHOLE_NUMBER] | None = Field(
        None, description="null: all cores"
    )
    padding: float = Field(
        0.0,
        ge=0,
        le=MAX_PADDING,
        description="generated token inputs (sequence_lengths without a dataset): the average share of "
        "pad tokens per row (attention mask 0), the first row of a batch full; 0: no padding",
    )

    def to_config(self) -> MeasureConfig:
        return MeasureConfig(**self.model_dump())


class QuantizeIn(InputModel):
    """INT8 calibration; used when `precision` is int8."""

    model_config = ConfigDict(extra="forbid")

    calibration: CalibrationName = Field(
        "minmax",
        description="the INT8 quantization method; GET /v1/capabilities describes each one",
    )
    per_channel: bool = True
    calibration_samples: Annotated[int, Field(ge=1), WHOLE_NUMBER] | None = Field(
        None, description="null: the whole calibration set"
    )
    reduce_range: bool | None = Field(None, description="7-bit weights; null: chosen from the CPU's features")
    nodes_to_exclude: list[Text] = Field(default_factory=list, description="node names kept in float")

    def to_config(self) -> QuantizeConfig:
        return QuantizeConfig(**{**self.model_dump(), "nodes_to_exclude": tuple(self.nodes_to_exclude)})


#: The largest `max_drop` taken as meant: a budget above 50 points is a unit mistake (1 sent for 1 %).
MAX_BUDGET_DROP = 0.5
#: `max_drop`'s bound in the document: anything larger is no drop at all; up to it, a value over
#: MAX_BUDGET_DROP is answered with its probable reading (`budget_out_of_range`).
_DROP_BOUND = 100
_DROP_DESCRIPTION = (
    f"a fraction: 0.01 = 1 point; at most {MAX_BUDGET_DROP:g} (over it, a 422 `budget_out_of_range` "
    "gives the value it probably meant)"
)
_METRIC_DESCRIPTION = (
    "top1 needs labels in the evaluation set; left out: top1 when the evaluation set has labels, "
    "else fidelity"
)


def budget_reading(max_drop: float, relative: bool = False) -> str | None:
    """Why `max_drop` cannot be meant, with what it probably meant (None: it is in range). The
    sentence of the 422 `budget_out_of_range` (app.api.errors), e.g. "max_drop 1 would allow a
    100-point drop; for 1 point send 0.01"."""
    if max_drop <= MAX_BUDGET_DROP:
        return None
    if relative:
        allowed = f"a drop of {max_drop * 100:g} % of the original's score"
        meant = f"for {max_drop:g} % send {max_drop / 100:g}"
    else:
        allowed = f"a {max_drop * 100:g}-point drop"
        unit = "point" if max_drop == 1 else "points"
        meant = f"for {max_drop:g} {unit} send {max_drop / 100:g}"
    return (
        f"max_drop {max_drop:g} would allow {allowed}; {meant} (max_drop is a fraction, 0.01 = 1 point, "
        f"at most {MAX_BUDGET_DROP:g})"
    )


def _check_budget(max_drop: float, relative: bool = False) -> None:
    reading = budget_reading(max_drop, relative)
    if reading is not None:
        raise PydanticCustomError(BUDGET_OUT_OF_RANGE, reading)


#: The code (and pydantic error type) of a budget over MAX_BUDGET_DROP.
BUDGET_OUT_OF_RANGE = "budget_out_of_range"


class AccuracyBudgetIn(InputModel):
    """Keep the most error-prone nodes in float until the drop is within `max_drop` (0.01 = 1 point).

    `top1` needs labels. `fidelity` needs none: the cosine similarity to the original's outputs (and,
    for class scores, the top-1 agreement) must stay at or above 1 - max_drop. Left out, the metric
    is top1 with a labelled evaluation set, else fidelity."""

    model_config = ConfigDict(extra="forbid")

    metric: BudgetMetric = Field("top1", description=_METRIC_DESCRIPTION)
    max_drop: float = Field(0.01, ge=0, le=_DROP_BOUND, description=_DROP_DESCRIPTION)

    @model_validator(mode="after")
    def _in_range(self) -> AccuracyBudgetIn:
        _check_budget(self.max_drop)
        return self

    @property
    def metric_stated(self) -> bool:
        return "metric" in self.model_fields_set

    def to_config(self) -> AccuracyBudget:
        return AccuracyBudget(**self.model_dump())


class RatiosFromSensitivityIn(InputModel):
    model_config = ConfigDict(extra="forbid")

    job_id: Text | None = Field(
        None, description="a succeeded sensitivity job of this model; null: the latest"
    )
    max_drop: float = Field(0.01, ge=0, le=1)


class SensitivityCreate(InputModel):
    """Prune each layer alone at a few ratios and measure the drop (top-1 with labels, else fidelity)."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: Text
    method: SensitivityCriterion = "l1"
    ratios: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.7], min_length=1, max_length=10
    )

    @field_validator("ratios")
    @classmethod
    def _sorted(cls, ratios: list[float]) -> list[float]:
        return sorted(set(ratios))


class PruneIn(InputModel):
    """Structured channel pruning (l1, slimming, taylor, fpgm, random) or unstructured magnitude."""

    model_config = ConfigDict(extra="forbid")

    method: PruneCriterion = "l1"
    ratio: float = Field(0.5, gt=0, lt=1, description="structured: fraction of channels removed")
    scope: Literal["uniform", "global"] = "uniform"
    round_to: Integer = Field(8, ge=1, le=256, description="keep channel counts multiples of this")
    ignore: list[Text] = Field(default_factory=list, description="layer (node) names never pruned")
    sparsity: float = Field(0.8, gt=0, lt=1, description="magnitude: fraction of weights set to zero")
    sparsity_epochs: Integer = Field(
        0, ge=0, le=200, description="slimming: epochs of L1 on BatchNorm γ first"
    )
    sparsity_lambda: float = Field(1e-4, ge=0, le=1, description="slimming: weight of that L1 penalty")
    ratios_from_sensitivity: RatiosFromSensitivityIn | None = Field(
        None, description="per-layer ratios: the largest each layer took within max_drop in that analysis"
    )

    def to_config(self) -> PruneConfig:
        fields = self.model_dump(exclude={"ratios_from_sensitivity"})
        return PruneConfig(**{**fields, "ignore": tuple(self.ignore)})


class FinetuneIn(InputModel):
    """Recovery after pruning: knowledge distillation from the original (mixed with CE when labelled).
    Defaults are `engines.prune.finetune.FinetuneConfig`'s (bench/prune.py's recovery table shows why)."""

    model_config = ConfigDict(extra="forbid")

    epochs: Integer = Field(FinetuneConfig.epochs, ge=1, le=200)
    lr: float = Field(FinetuneConfig.lr, gt=0, le=1, description="peak of the one-cycle schedule (Adam)")
    distill: bool = FinetuneConfig.distill
    temperature: float = Field(FinetuneConfig.temperature, gt=0, le=100)
    alpha: float = Field(
        FinetuneConfig.alpha, ge=0, le=1, description="weight of distillation vs cross-entropy"
    )
    batch_size: Integer = Field(FinetuneConfig.batch_size, ge=1, le=4096)
    reinsert_batchnorm: bool = Field(
        FinetuneConfig.reinsert_batchnorm,
        description="train with a BatchNorm after each convolution that has none (exports with BatchNorm "
        "folded), folded back afterwards: the exported graph is unchanged",
    )

    def to_config(self) -> FinetuneConfig:
        return FinetuneConfig(**self.model_dump())


class QatIn(InputModel):
    """Quantization-aware training (precision int8): the model fine-tuned with fake quantization on the
    calibration (training) set, learning the original's outputs (distillation; with labels mixed with
    cross-entropy), exported as QDQ INT8. Defaults are `engines.qat.config.QatConfig`'s."""

    model_config = ConfigDict(extra="forbid")

    epochs: Integer = Field(QatConfig.epochs, ge=1, le=20)
    learning_rate: float = Field(
        QatConfig.learning_rate, gt=0, le=1, description="peak of the one-cycle schedule (Adam)"
    )
    batch_size: Integer = Field(QatConfig.batch_size, ge=1, le=4096)
    distill: bool = Field(
        QatConfig.distill,
        description="learn the original's outputs (no labels needed); false: labels only (cross-entropy)",
    )

    def to_config(self) -> QatConfig:
        return QatConfig(**self.model_dump())


class DynamicIn(InputModel):
    """Dynamic INT8 (precision int8-dynamic): weights in int8, activations quantized at run time; no
    calibration set. Defaults are `engines.quantize.dynamic.DynamicConfig`'s."""

    model_config = ConfigDict(extra="forbid")

    per_channel: bool = Field(True, description="a scale per output column of each weight")
    reduce_range: bool | None = Field(None, description="7-bit weights; null: chosen from the CPU's features")
    op_types: list[Literal[DYNAMIC_OP_TYPES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(DEFAULT_OP_TYPES),
        min_length=1,
        description="ops whose constant weights are quantized (Gemm as MatMul; Gather: embedding tables, "
        "a smaller file but no faster)",
    )
    nodes_to_exclude: list[Text] = Field(default_factory=list, description="node names kept in float")

    @field_validator("op_types")
    @classmethod
    def _distinct_op_types(cls, op_types: list[str]) -> list[str]:
        return list(dict.fromkeys(op_types))

    def to_config(self) -> DynamicConfig:
        return DynamicConfig(
            per_channel=self.per_channel,
            reduce_range=self.reduce_range,
            op_types=tuple(self.op_types),
            nodes_to_exclude=tuple(self.nodes_to_exclude),
        )


class WeightOnlyIn(InputModel):
    """Weight-only quantization (precisions int4-weight, int8-weight: the bits are the precision's):
    MatMul weights stored block by block in ONNX Runtime's MatMulNBits; activations stay float.
    Defaults are `engines.quantize.weight_only.WeightOnlyConfig`'s."""

    model_config = ConfigDict(extra="forbid")

    block_size: Annotated[Literal[BLOCK_SIZES], WHOLE_NUMBER] = Field(  # type: ignore[valid-type]
        WeightOnlyConfig.block_size, description="weights per scale, along K (a power of two, at least 16)"
    )
    algorithm: Literal[WEIGHT_ONLY_ALGORITHMS] = Field(  # type: ignore[valid-type]
        WeightOnlyConfig.algorithm,
        description="rtn: round to nearest; hqq: half-quadratic, no data; gptq: from the calibration set "
        "(int4-weight, symmetric)",
    )
    symmetric: bool | None = Field(
        None, description="no zero points; null: the algorithm's own (rtn, gptq: true; hqq: false)"
    )
    accuracy_level: Annotated[Literal[ACCURACY_LEVELS], WHOLE_NUMBER] | None = Field(  # type: ignore[valid-type]
        None,
        description="MatMulNBits' lowest compute precision: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
        "(activations quantized per block at run time); null: 4 for int8-weight (ONNX Runtime's 8-bit "
        "kernel is slower than fp32 computing in float), unset for int4-weight",
    )
    embeddings: bool = Field(
        False, description="also store Gather's embedding tables in 4 bits (rtn, int4-weight only)"
    )
    nodes_to_exclude: list[Text] = Field(default_factory=list, description="node names kept in float")

    def to_config(self) -> WeightOnlyConfig:
        return WeightOnlyConfig(**{**self.model_dump(), "nodes_to_exclude": tuple(self.nodes_to_exclude)})


GraphModelType = Literal[(OFF, AUTO, *model_type_names())]  # type: ignore[valid-type]


class GraphOptimizationIn(InputModel):
    """ONNX Runtime's transformer optimizer (fused Attention, LayerNorm, GELU, embeddings) before the
    precision. `auto` detects the model type, heads and hidden size from the graph (a model it does
    not identify runs unfused, and the job says so); a model type (GET /v1/capabilities lists them)
    with `num_heads` and `hidden_size` states them where detection cannot; `off` skips the stage.
    Stated values the graph contradicts, or a transformer's heads and hidden size neither stated nor
    found, are a 422 that says how to state them."""

    model_config = ConfigDict(extra="forbid")

    model_type: GraphModelType = Field(AUTO, description="off, auto, or the model type")  # type: ignore[valid-type]
    num_heads: Annotated[int, Field(ge=1, le=1024), WHOLE_NUMBER] | None = Field(
        None, description="attention heads; null: read from the graph"
    )
    hidden_size: Annotated[int, Field(ge=1, le=65536), WHOLE_NUMBER] | None = Field(
        None, description="num_heads × head size; null: read from the graph"
    )

    def to_config(self) -> GraphOptConfig:
        return GraphOptConfig(**self.model_dump())


class RecipeIn(InputModel):
    model_config = ConfigDict(extra="forbid")

    targets: list[BackendName] = Field(default_factory=lambda: ["onnxruntime-cpu"], min_length=1)  # type: ignore[valid-type]
    precision: Precision = "fp32"
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096), WHOLE_NUMBER]] = Field(
        default_factory=lambda: [1, 8], min_length=1, max_length=16
    )
    sequence_lengths: list[Annotated[int, Field(ge=1, le=MAX_SEQUENCE_LENGTH), WHOLE_NUMBER]] = Field(
        default_factory=list,
        max_length=16,
        description="a model whose token inputs have a dynamic sequence dim: latency at each batch size and "
        "each of these lengths (no more than its position table holds); empty: the batch sizes alone",
    )
    quantize: QuantizeIn = Field(default_factory=QuantizeIn)
    accuracy_budget: AccuracyBudgetIn | None = None
    prune: PruneIn | None = None
    finetune: FinetuneIn | None = None
    qat: QatIn | None = None
    graph_optimization: GraphOptimizationIn | None = Field(
        None, description="transformer graph optimization before the precision; null: none"
    )
    dynamic: DynamicIn = Field(default_factory=DynamicIn)
    weight_only: WeightOnlyIn = Field(default_factory=WeightOnlyIn)
    measure: MeasureIn = Field(default_factory=MeasureIn)

    @field_validator("targets")
    @classmethod
    def _distinct_targets(cls, targets: list[str]) -> list[str]:
        return list(dict.fromkeys(targets))

    @field_validator("batch_sizes", "sequence_lengths")
    @classmethod
    def _sorted_batch_sizes(cls, sizes: list[int]) -> list[int]:
        return sorted(set(sizes))

    def to_config(self) -> Recipe:
        return Recipe(
            targets=tuple(self.targets),
            precision=self.precision,
            batch_sizes=tuple(self.batch_sizes),
            sequence_lengths=tuple(self.sequence_lengths),
            quantize=self.quantize.to_config(),
            accuracy_budget=self.accuracy_budget.to_config() if self.accuracy_budget else None,
            prune=self.prune.to_config() if self.prune else None,
            finetune=self.finetune.to_config() if self.finetune else None,
            qat=self.qat.to_config() if self.qat else None,
            graph_optimization=(
                self.graph_optimization.to_config() if self.graph_optimization else GraphOptConfig()
            ),
            dynamic=self.dynamic.to_config(),
            weight_only=self.weight_only.to_config(),
            measure=self.measure.to_config(),
        )


#: The example Swagger UI fills POST /v1/jobs with: a small valid recipe (put a model id of yours).
JOB_EXAMPLE = {
    "model_id": "mdl_0123456789abcdef",
    "recipe": {"targets": ["onnxruntime-cpu"], "precision": "fp32", "batch_sizes": [1, 8]},
}
#: The example of POST /v1/models/{id}/optimize: a labelled evaluation set, a 1-point budget, 5 minutes.
AUTOTUNE_EXAMPLE = {
    "evaluation_dataset_id": "ds_0123456789abcdef",
    "accuracy_budget": {"metric": "top1", "max_drop": 0.01},
    "time_budget_minutes": 5,
}


class JobCreate(InputModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_EXAMPLE]})

    model_id: Text
    calibration_dataset_id: Text | None = None
    evaluation_dataset_id: Text | None = None
    recipe: RecipeIn = Field(default_factory=RecipeIn)


class ObjectiveIn(InputModel):
    """What to minimize: latency (p50) or 1/throughput at `batch_size`, or the engine's size."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal[OBJECTIVE_METRICS] = "latency"  # type: ignore[valid-type]
    batch_size: Integer = Field(1, ge=1, le=4096)
    sequence_length: Annotated[int, Field(ge=1, le=MAX_SEQUENCE_LENGTH), WHOLE_NUMBER] | None = Field(
        None,
        description="a model whose token inputs have a dynamic sequence dim: measure at this length "
        "(generated or the evaluation set's tokens cut or padded to it); null: the evaluation set's own",
    )


class SearchBudgetIn(InputModel):
    """The accuracy the engine may lose: `max_drop` of top-1 (needs labels) or of fidelity to the
    original, in points (0.01 = 1 point), or as a fraction of the original's score with `relative`."""

    model_config = ConfigDict(extra="forbid")

    metric: BudgetMetric = Field("top1", description=_METRIC_DESCRIPTION)
    max_drop: float = Field(0.01, ge=0, le=_DROP_BOUND, description=_DROP_DESCRIPTION)
    relative: bool = False

    @model_validator(mode="after")
    def _in_range(self) -> SearchBudgetIn:
        _check_budget(self.max_drop, self.relative)
        return self

    @property
    def metric_stated(self) -> bool:
        return "metric" in self.model_fields_set


class SearchSpaceIn(InputModel):
    """Narrow the search; every field is optional (defaults: every CPU backend this worker runs, every
    precision they build (each skipped with the reason where it does not apply to the model or this
    CPU), every calibration method, pruning at 0.3 and 0.5 with recovery training)."""

    model_config = ConfigDict(extra="forbid")

    backends: list[BackendName] | None = None  # type: ignore[valid-type]
    precisions: list[Precision] | None = None  # type: ignore[valid-type]
    calibrations: list[CalibrationName] | None = None  # type: ignore[valid-type]
    prune_ratios: list[Annotated[float, Field(ge=0, lt=1)]] | None = Field(None, max_length=6)
    prune_method: PruneCriterion = "l1"  # type: ignore[valid-type]
    finetune_epochs: Integer = Field(4, ge=0, le=50)
    float_fallback: bool = True
    max_full_evaluations: Integer = Field(30, ge=1, le=200)
    qat_epochs: Integer = Field(
        3, ge=0, le=50, description="QAT when post-training INT8 and its fallback break the budget; 0: never"
    )
    sensitivity: bool = Field(
        False,
        description="run a pruning sensitivity analysis before the first pruning when the model has none "
        "(per-layer ratios within the budget); it takes minutes on a 224×224 network",
    )
    graph_optimization: GraphOptimizationIn = Field(
        default_factory=GraphOptimizationIn,
        description="transformer fusion before the first candidate (default auto: detected; a model "
        'that is not identified runs unfused); {"model_type": "off"} leaves it out',
    )

    @field_validator("backends")
    @classmethod
    def _distinct_backends(cls, backends: list[str] | None) -> list[str] | None:
        return None if backends is None else list(dict.fromkeys(backends))

    def to_config(self) -> SearchSpace:
        defaults = SearchSpace()
        return SearchSpace(
            backends=tuple(self.backends or ()),
            precisions=tuple(self.precisions or defaults.precisions),
            calibrations=tuple(self.calibrations if self.calibrations is not None else defaults.calibrations),
            prune_ratios=tuple(self.prune_ratios if self.prune_ratios is not None else defaults.prune_ratios),
            prune_method=self.prune_method,
            finetune_epochs=self.finetune_epochs,
            float_fallback=self.float_fallback,
            max_full_evaluations=self.max_full_evaluations,
            qat_epochs=self.qat_epochs,
            sensitivity=self.sensitivity,
            graph_optimization=self.graph_optimization.to_config(),
        )


class AutotuneCreate(InputModel):
    """The fastest engine within an accuracy budget: `POST /v1/models/{id}/optimize`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [AUTOTUNE_EXAMPLE]})

    evaluation_dataset_id: Text = Field(description="scores every candidate; labels for a top1 budget")
    calibration_dataset_id: Text | None = Field(
        None, description="calibrates INT8 and trains pruned models; without it, no INT8 or pruning"
    )
    objective: ObjectiveIn = Field(default_factory=ObjectiveIn)
    accuracy_budget: SearchBudgetIn = Field(default_factory=SearchBudgetIn)
    time_budget_minutes: float = Field(30.0, ge=MIN_TIME_BUDGET_MINUTES, le=24 * 60)
    space: SearchSpaceIn = Field(default_factory=SearchSpaceIn)
    alias: Alias | None = Field(None, description="given to the chosen engine")

    def to_config(self, sensitivity_ratios: dict[str, float] | None = None) -> AutotuneRequest:
        return AutotuneRequest(
            objective=Objective(**self.objective.model_dump()),
            budget=Budget(**self.accuracy_budget.model_dump()),
            time_budget_s=self.time_budget_minutes * 60.0,
            space=self.space.to_config(),
            sensitivity_ratios=sensitivity_ratios,
        )


class JobError(BaseModel):
    """`code` and `detail`, and what the error adds (e.g. `operators` for `unsupported_op`)."""

    model_config = ConfigDict(extra="allow")

    code: str
    detail: str


JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobKindName = Literal[JobKind.ALL]  # type: ignore[valid-type]


class JobOut(BaseModel):
    id: str
    model_id: str | None = Field(
        description="null for decode_images and tokenize_texts jobs (they make a dataset's arrays)"
    )
    kind: str = Field(
        description="optimize (a recipe), sensitivity (a pruning sensitivity analysis), autotune "
        "(POST /v1/models/{id}/optimize: the fastest engine within an accuracy budget), convert (a "
        "PyTorch program uploaded as .pt2, to ONNX)"
    )
    calibration_dataset_id: str | None
    evaluation_dataset_id: str | None
    recipe: dict[str, Any]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str
    progress: float
    messages: list[str]
    error: JobError | None
    cancel_requested: bool
    attempts: int
    worker: str | None = Field(description="host:pid of the worker running the current attempt")
    heartbeat_at: datetime | None
    engine_ids: list[str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    model_name: str | None = Field(None, description="the name of the job's model")
    kind_label: str = Field(
        "",
        description='the kind as people name it: "recipe" (kind optimize), "auto-optimize" (kind '
        "autotune), else the kind",
    )
    elapsed_s: float | None = Field(
        None, description="seconds since it started (running), or from start to end (finished)"
    )
    time_budget_s: float | None = Field(None, description="an auto-optimize search's time budget")
    remaining_s: float | None = Field(None, description="a running search: seconds of its time budget left")
    best: dict[str, Any] | None = Field(
        None,
        description="a running search's best within the budget so far, the chosen engine once it "
        "succeeded (the original when nothing beat it), a recipe's fastest engine: label, speedup "
        "(× the original, higher is better), drop (a fraction: 0.01 = 1 point), lineage, engine_id",
    )


class EngineOut(BaseModel):
    id: str
    job_id: str
    model_id: str
    backend: str
    precision: str
    size_bytes: int
    sha256: str | None = Field(
        None,
        description="the engine file's sha256, recorded when it was built; a node pulling the engine from "
        "the store checks it (null for engines built before this was recorded)",
    )
    build_seconds: float = Field(description="the whole build: pruning, quantization and compilation")
    hardware: dict[str, Any]
    metrics: dict[str, Any] = Field(
        description="latency per batch size, accuracy, and ratios vs the baseline"
    )
    build_info: dict[str, Any]
    lineage: dict[str, Any] = Field(
        default_factory=dict,
        description="where it came from: backend, precision, pruning ({criterion, ratio} or null), "
        "fallback_nodes (nodes kept in float), calibration, qat, and a one-line label",
    )
    alias: str | None = Field(description="a name to infer with instead of the id (/v2/models/{alias})")
    batching: BatchingIn | None = Field(description="dynamic batching of concurrent requests; null: off")
    max_batch: int = Field(
        description="the most samples one inference request may carry (413 batch_too_large above it): "
        "the server's default, or the largest batch the engine was measured at if larger, or a "
        "TensorRT engine's profile maximum"
    )
    created_at: datetime


class AliasIn(InputModel):
    model_config = ConfigDict(extra="forbid")

    alias: Alias = Field(examples=["digits-prod"])


class BatchingIn(InputModel):
    """Group concurrent requests into one engine call, as Triton's dynamic batcher does."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: Integer = Field(16, ge=1, le=4096, description="samples per engine call, at most")
    max_queue_delay_ms: float = Field(
        2.0, ge=0, le=10_000, description="how long the first request of a batch waits for company"
    )


class InferRequest(BaseModel):
    inputs: dict[str, Any] = Field(
        description="input name -> nested list of numbers, batch first", json_schema_extra=TEXT_KEYS
    )

    @field_validator("inputs")
    @classmethod
    def _names_without_control_characters(cls, inputs: dict[str, Any]) -> dict[str, Any]:
        check_text(list(inputs))  # the names only: the values are numbers, possibly millions
        return inputs


class InferResponse(BaseModel):
    engine_id: str
    outputs: dict[str, Any]
    compute_ms: float = Field(description="time of the engine call, server side")
    queue_ms: float = Field(0.0, description="time waiting for that call (dynamic batching)")
    batch_size: int = Field(description="samples in that call (more than sent when batched with others)")


class PrincipalOut(BaseModel):
    """Who the key that asks is: `key_id` null on a server with no key yet (loopback only)."""

    key_id: str | None
    project: str
    scopes: list[str]
    infer_rps: float | None = None


class ProjectIn(InputModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="the project's name and id: lowercase letters, digits, '-' and '_'",
        examples=["vision"],
    )


class ProjectOut(BaseModel):
    id: str
    created_at: datetime
    models: int
    datasets: int
    engines: int
    active_keys: int


class ApiKeyIn(InputModel):
    model_config = ConfigDict(extra="forbid")

    project: Text = Field(max_length=64, description="the project the key acts in", examples=["default"])
    name: str = Field(
        min_length=1, max_length=255, pattern=NAME_PATTERN, description="for people", examples=["ci"]
    )
    scopes: list[Literal["admin", "write", "read", "infer"]] = Field(
        default=["read", "write", "infer"],
        min_length=1,
        description="admin: projects and keys, and all of its project; write: create and delete "
        "(and read); read: list and download; infer: inference only (/v1 and /v2)",
    )
    infer_rps: float | None = Field(
        default=None, gt=0, description="inference requests per second (null: the server's default)"
    )


class ApiKeyOut(BaseModel):
    id: str
    project: str
    name: str
    prefix: str = Field(description="the key's first characters, to tell keys apart")
    scopes: list[str]
    infer_rps: float | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="the key itself: shown this once, stored only as a hash")
