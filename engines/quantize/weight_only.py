"""Weight-only quantization (precisions `int4-weight` and `int8-weight`): MatMul weights stored in 4 or
8 bits, block by block, in ONNX Runtime's com.microsoft MatMulNBits op; activations stay float.

What it is for: a model whose size (or memory traffic: a decoder's batch-1 steps read every weight
once per token) is its MatMul weights. Each block of `block_size` consecutive weights along K shares
one scale (and, asymmetric, one zero point), so int4 costs 4 bits per weight plus a float scale per
block: about 0.16× the float32 bytes at block 32. Three ways to choose the integers
(`onnxruntime.quantization.matmul_nbits_quantizer`, ONNX Runtime 1.32):
- `rtn`: round to nearest, per block (ONNX Runtime's C++ block quantizer); 4 or 8 bits; no data;
- `hqq`: Half-Quadratic Quantization (Badri & Shaji 2023), scales and zero points optimized per
  block without data (torch, a few seconds); 4 bits (its 8-bit weights keep float zero points, which
  ONNX Runtime's CPU kernel refuses). Its float zero points also keep ONNX Runtime's 4-bit CPU kernel
  off its fast path (MiniLM-L3, batch 1: 0.49× the fp32 speed, rtn 1.59×): it is for size;
- `gptq`: GPTQ (Frantar et al. 2023), each column's rounding error compensated in the columns not
  yet quantized, using the Hessian of the layer's inputs on the calibration set; 4 bits, symmetric.
  ONNX Runtime ships its own copy of Intel Neural Compressor's implementation
  (`onnxruntime.quantization.neural_compressor`), so the `neural-compressor` package is not needed.

Before quantizing: every node gets a unique name (ONNX Runtime's GPTQ sorts the graph by node name
and fails on duplicates), and Gemms with constant weights become MatMul + Add (the quantizer takes
MatMul only). `embeddings` also stores Gather's embedding tables in 4 bits (GatherBlockQuantized, by
rtn whatever the MatMuls' algorithm: hqq and gptq have no Gather form):
most of a small encoder's parameters are its vocabulary's table (MiniLM-L3: 69 %). Only real tables
are handed to it (engines.quantize.matmul_weights.embedding_tables: ONNX Runtime's Gather quantizer
takes any constant and writes models that do not load), a table tied to a MatMul is untied first,
the model is converted to opset 21 (the quantizer only relabels it), and the result is loaded in ONNX
Runtime before it is kept: where the tables cannot be stored (no table, a model the opset converter
cannot convert, a result that does not load) the MatMuls are quantized alone and a message says why
and what to do.

Where it runs: ONNX Runtime on the CPU, and OpenVINO, whose ONNX frontend reads MatMulNBits and
GatherBlockQuantized (checked with OpenVINO 2026.4: the same outputs as ONNX Runtime). TensorRT and
the torch backends (onnx2torch) have no such ops.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import EngineError, InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.quantize.matmul_weights import (
    embedding_tables,
    gemm_as_matmul,
    matmul_weights,
    name_nodes,
    untie_tables,
)
from engines.quantize.methods import QuantizeResult

WEIGHT_ONLY_ALGORITHMS: tuple[str, ...] = ("rtn", "hqq", "gptq")
#: MatMulNBits' block sizes: a power of two, at least 16 (its kernels' contract).
BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
#: MatMulNBits' accuracy_level: the lowest precision its kernel may compute in (0: unset, 1: fp32,
#: 2: fp16, 3: bf16, 4: int8, activations quantized block by block at run time).
ACCURACY_LEVELS: tuple[int, ...] = (0, 1, 2, 3, 4)
#: Bits of each weight-only precision.
PRECISION_BITS: dict[str, int] = {"int4-weight": 4, "int8-weight": 8}
#: The search tries weight-only quantization where MatMul/Gemm weights are at least this share of all
#: the model's weights: the file shrinks by that share only.
WEIGHT_ONLY_MIN_SHARE = 0.5
#: The opset ONNX Runtime writes when it quantizes embedding tables (int4 types).
EMBEDDINGS_OPSET = 21
#: GPTQ's Hessians from at most this many calibration samples (the cost is a forward pass each).
GPTQ_MAX_SAMPLES = 128
_EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass(frozen=True)
class WeightOnlyConfig:
    """How `int4-weight` / `int8-weight` quantize (the recipe's `weight_only`); bits are the precision's."""

    block_size: int = 32
    algorithm: str = "rtn"
    symmetric: bool | None = None  # None: the algorithm's own (rtn, gptq: symmetric; hqq: asymmetric)
    accuracy_level: int | None = None  # None: compute_level's choice for the precision's bits
    embeddings: bool = False  # also Gather's embedding tables, in 4 bits (GatherBlockQuantized)
    nodes_to_exclude: tuple[str, ...] = ()

    def is_symmetric(self) -> bool:
        return self.symmetric if self.symmetric is not None else self.algorithm != "hqq"

    def compute_level(self, bits: int) -> int:
        """MatMulNBits' accuracy_level: the recipe's, else 4 (int8 arithmetic, activations quantized per
        block at run time) for 8-bit weights and unset for 4-bit ones. On MiniLM-L3 at batch 1 (2 cores,
        AVX-512 VNNI) ONNX Runtime's 8-bit kernel computing in float ran at 0.31× the fp32 model's
        speed and at 1.27× with level 4, with the same cosine; 4-bit weights ran at 1.59× unset and
        1.43× at level 4."""
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 4 if bits == 8 else 0


def check_weight_only(config: WeightOnlyConfig, bits: int, *, has_calibration: bool) -> None:
    """InvalidRecipeError for settings ONNX Runtime 1.32 cannot make into a model its CPU kernels run;
    the message says what to ask for instead. Called when the job is made and again at build."""
    if config.algorithm not in WEIGHT_ONLY_ALGORITHMS:
        raise InvalidRecipeError(
            f"weight_only.algorithm '{config.algorithm}' is unknown; "
            f"use one of {list(WEIGHT_ONLY_ALGORITHMS)}"
        )
    if config.block_size not in BLOCK_SIZES:
        raise InvalidRecipeError(
            f"weight_only.block_size {config.block_size} is not one MatMulNBits takes (a power of two, "
            f"at least 16): use one of {list(BLOCK_SIZES)}"
        )
    if config.accuracy_level is not None and config.accuracy_level not in ACCURACY_LEVELS:
        raise InvalidRecipeError(f"weight_only.accuracy_level must be one of {list(ACCURACY_LEVELS)}")
    if bits not in (4, 8):
        raise InvalidRecipeError(f"weight-only quantization stores 4 or 8 bits, not {bits}")
    name = f"int{bits}-weight"
    if config.algorithm == "hqq" and bits == 8:
        raise InvalidRecipeError(
            "hqq's 8-bit weights keep float zero points, which ONNX Runtime's CPU MatMulNBits kernel "
            "refuses: use algorithm rtn for int8-weight, or int4-weight with hqq"
        )
    if config.algorithm == "hqq" and config.symmetric:
        raise InvalidRecipeError("hqq optimizes a zero point per block (asymmetric): leave out symmetric")
    if config.algorithm == "gptq":
        if bits != 4:
            raise InvalidRecipeError(
                "ONNX Runtime's GPTQ writes MatMulNBits at 4 bits only: use int4-weight with gptq, "
                "or algorithm rtn for int8-weight"
            )
        if config.symmetric is False:
            raise InvalidRecipeError(
                "ONNX Runtime 1.32's GPTQ packs asymmetric zero points wrongly (its model fails to "
                "build on weights with an odd number of blocks): use symmetric weights with gptq"
            )
        if config.nodes_to_exclude:
            raise InvalidRecipeError(
                "ONNX Runtime 1.32's GPTQ quantizes every constant MatMul (it does not read "
                "nodes_to_exclude): leave out nodes_to_exclude, or use algorithm rtn or hqq"
            )
        if not has_calibration:
            raise InvalidRecipeError(
                "gptq learns its rounding from the layers' inputs: give a calibration dataset "
                "(calibration_dataset_id), or use algorithm rtn or hqq, which need no data"
            )
    if config.embeddings and bits != 4:
        raise InvalidRecipeError(
            f"embedding tables are stored in 4 bits only (ONNX Runtime's GatherBlockQuantized); "
            f"leave out embeddings for {name}"
        )


def weight_only_not_applicable(model_path: Path) -> str | None:
    """Why weight-only quantization has nothing to store in fewer bits here, or None."""
    if matmul_weights(model_path).weight_only_nodes == 0:
        return (
            "weight-only quantization stores the constant weights of MatMul and Gemm nodes in 4 or 8 "
            "bits, and this model has none (its weights are read by other ops, e.g. convolutions): use "
            "precision int8 with a calibration set"
        )
    return None


def weight_only_does_not_pay(model_path: Path) -> str | None:
    """Why the search leaves weight-only out for this model although it applies, or None."""
    weights = matmul_weights(model_path)
    share = weights.share_of_parameters
    if share < WEIGHT_ONLY_MIN_SHARE:
        smallest = (1 - share) + share * 0.16
        return (
            f"MatMul/Gemm weights hold {share:.0%} of this model's parameters (the rest are embedding "
            f"tables or convolutions): int4 weights would leave it at about {smallest:.2f}× its size; "
            "weight-only pays where they hold at least half (a recipe can still ask for it, with "
            "weight_only.embeddings for the tables)"
        )
    return None


class _CalibrationBatches:
    """Calibration batches for ONNX Runtime's GPTQ, which deep-copies its reader and iterates the copy
    (a generator, as engines.quantize.int8's reader holds, cannot be copied): the batches are taken
    up front, at most GPTQ_MAX_SAMPLES samples."""

    def __init__(self, calibration: Dataset, batch_size: int):
        samples = min(calibration.samples, GPTQ_MAX_SAMPLES)
        batch = max(1, min(batch_size, samples))
        starts = range(0, samples - batch + 1, batch)
        self.batches = [calibration.batch(start, start + batch) for start in starts]
        self.samples = batch * len(self.batches)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.batches):
            return None
        self._next += 1
        return self.batches[self._next - 1]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(copy.copy(self.batches))

    def __deepcopy__(self, memo: dict[int, Any]) -> _CalibrationBatches:
        twin = copy.copy(self)
        twin._next = 0
        return twin


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's weight-only quantizers log a line per node at INFO and GPTQ draws a progress bar
    on stdout, and HQQ's torch warns about read-only numpy weights it only reads: in a worker's log that
    is noise (thousands of lines for a transformer)."""
    names = ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization.neural_compressor")
    loggers = [logging.getLogger(name) for name in names]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            yield
    finally:
        for item, level in zip(loggers, levels, strict=True):
            item.setLevel(level)


def _algorithm_config(
    config: WeightOnlyConfig, bits: int, calibration: _CalibrationBatches | None, tables: bool
) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
    )

    if config.algorithm == "hqq":
        return HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=bits)
    if config.algorithm == "gptq":
        return GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration)
    return _rtn_config(config, bits, ("MatMul", "Gather") if tables else ("MatMul",))


def _rtn_config(config: WeightOnlyConfig, bits: int, op_types: tuple[str, ...]) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    return DefaultWeightOnlyQuantConfig(
        block_size=config.block_size,
        is_symmetric=config.is_symmetric(),
        bits=bits,
        op_types_to_quantize=op_types,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )


def quantize_weight_only(
    model_path: Path,
    workdir: Path,
    bits: int,
    config: WeightOnlyConfig,
    *,
    calibration: Dataset | None = None,
    batch_size: int = 1,
    check_cancelled: Callable[[], None] = lambda: None,
) -> QuantizeResult:
    """The model with its constant MatMul weights (and, asked, embedding tables) in `bits` bits."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    check_weight_only(config, bits, has_calibration=calibration is not None)
    reason = weight_only_not_applicable(model_path)
    if reason is not None:
        raise EngineError(reason, code="quantization_not_applicable")
    started = time.perf_counter()
    messages: list[str] = []
    model = onnx.load(str(model_path))
    name_nodes(model)
    rewritten = gemm_as_matmul(model)
    if rewritten:
        messages.append(
            f"{rewritten} Gemm node(s) written as MatMul + Add, so that their weights are quantized"
        )
    tables: list[str] = []
    excluded = list(config.nodes_to_exclude)
    kept_float: str | None = None
    if config.embeddings:
        tables, others, kept_float, notes = _prepare_tables(model)
        messages += notes
        excluded += others
    check_cancelled()
    reader = _CalibrationBatches(calibration, batch_size) if config.algorithm == "gptq" else None
    if reader is not None:
        assert calibration is not None
        if not reader.batches:
            raise InvalidRecipeError(
                "gptq needs at least one calibration batch; the calibration set has none"
            )
        if reader.samples < calibration.samples:
            messages.append(f"gptq: Hessians from the first {reader.samples} calibration samples")
    symmetric = config.is_symmetric()
    passes = [_algorithm_config(config, bits, reader, bool(tables))]
    if tables and config.algorithm != "rtn":  # the tables by rtn, after the MatMuls
        passes.append(_rtn_config(config, bits, ("Gather",)))
    quantized = model
    for algo_config in passes:
        try:
            with _quiet():
                quantizer = MatMulNBitsQuantizer(
                    quantized,
                    bits=bits,
                    block_size=config.block_size,
                    is_symmetric=symmetric,
                    nodes_to_exclude=excluded,
                    algo_config=algo_config,
                )
                quantizer.process()
        except Exception as exc:
            raise EngineError(
                f"weight-only quantization ({config.algorithm}, {bits} bits) failed: "
                f"{type(exc).__name__}: {str(exc)[:300]}",
                code="quantization_failed",
            ) from exc
        quantized = quantizer.model.model
    level = config.compute_level(bits)
    _set_accuracy_level(quantized, level)
    _import_contrib_opset(quantized)
    if config.algorithm == "hqq":
        messages.append(
            "hqq writes float zero points, which ONNX Runtime's CPU MatMulNBits kernel runs on a slower path "
            "than rtn's integer ones: an hqq engine is for size, measure it before serving it for speed"
        )
    counts = Counter(node.op_type for node in quantized.graph.node if node.domain == "com.microsoft")
    if not counts.get("MatMulNBits"):
        raise EngineError(
            "weight-only quantization quantized no MatMul of this model (its weights are not 2-D "
            "constants, or every such node was excluded): there is nothing to store in fewer bits",
            code="quantization_not_applicable",
        )
    out_path = workdir / f"model-int{bits}-weight.onnx"
    large = quantized.ByteSize() >= _EXTERNAL_DATA_BYTES
    onnx.save_model(quantized, str(out_path), save_as_external_data=large, location=out_path.name + ".data")
    error = _load_error(out_path) if tables else None
    if error is not None:  # the MatMuls alone, and say why
        retry = quantize_weight_only(
            model_path,
            workdir,
            bits,
            dataclasses.replace(config, embeddings=False),
            calibration=calibration,
            batch_size=batch_size,
            check_cancelled=check_cancelled,
        )
        reason = (
            f"the model with 4-bit embedding tables does not load in ONNX Runtime ({error}), so the tables "
            "stay in float and the MatMul weights are quantized alone; leave out weight_only.embeddings "
            "to build it without the attempt"
        )
        retry.metadata["weight_only"].update(embeddings=True, embeddings_kept_float=reason)
        retry.messages.insert(0, f"embedding tables kept in float: {reason}")
        return retry
    weights = matmul_weights(model_path)
    return QuantizeResult(
        out_path,
        {
            "weight_only": {
                "bits": bits,
                "block_size": config.block_size,
                "algorithm": config.algorithm,
                "symmetric": symmetric,
                "accuracy_level": level,
                "embeddings": config.embeddings,
                "embedding_tables": tables,
                "embeddings_kept_float": kept_float,
                "nodes_kept_float": list(config.nodes_to_exclude),
                "quantized_ops": dict(sorted(counts.items())),
                "gemm_rewritten": rewritten,
                "calibration_samples": reader.samples if reader is not None else None,
                "weights": weights.to_dict(),
            },
            "quantize_seconds": time.perf_counter() - started,
        },
        messages,
    )


def _prepare_tables(model: Any) -> tuple[list[str], list[str], str | None, list[str]]:
    """Make `model` ready to have its embedding tables stored in 4 bits: (the tables, the Gather nodes
    the quantizer must leave alone, why the tables stay in float or None, messages). Untied from the
    MatMuls that share them, and converted to opset 21, where there are tables to store."""
    found = embedding_tables(model)
    others = list(found.others)
    if not found.tables:
        reason = (
            "no Gather reads a table GatherBlockQuantized can hold (a 2-D float or float16 constant "
            "gathered along its rows)"
            + (f"; its {len(others)} Gather(s) over constants read other kinds" if others else "")
            + ", so weight_only.embeddings has nothing to store: leave it out"
        )
        return [], others, reason, [f"embedding tables: {reason}"]
    messages: list[str] = []
    converted, reason = _opset_for_embeddings(model)
    if reason is not None:
        return [], others, reason, [f"embedding tables kept in float: {reason}"]
    messages += converted
    if found.tied:
        untie_tables(model, found.tied)
        messages.append(
            f"{len(found.tied)} embedding table(s) also read by a MatMul as its weight (tied embeddings): "
            "the MatMul gets its own copy, so that both are stored in 4 bits, each in its operator's form"
        )
    if others:
        messages.append(
            f"{len(others)} Gather node(s) over other constants (integer, bfloat16, 1-D, or gathered along "
            "another axis) left as they are: GatherBlockQuantized holds float and float16 tables gathered "
            "along their rows"
        )
    return list(found.tables), others, None, messages


def _opset_for_embeddings(model: Any) -> tuple[list[str], str | None]:
    """ONNX Runtime's quantizer marks a model whose embedding tables it quantizes as opset 21 (the
    int4 types) without converting its nodes: an opset-17 ReduceMean keeps its `axes` attribute, which
    opset 18 moved to an input, and the model no longer loads (seen on SmolLM2's RMSNorm). So the model
    is converted to opset 21 first: (messages, None), or ([], why it could not be)."""
    from onnx import version_converter

    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    if opset >= EMBEDDINGS_OPSET:
        return [], None
    try:
        converted = version_converter.convert_version(model, EMBEDDINGS_OPSET)
    except Exception as exc:
        return [], (
            f"4-bit tables need opset {EMBEDDINGS_OPSET}, and ONNX's converter could not convert this "
            f"opset-{opset} model ({type(exc).__name__}: {str(exc)[:200]}); the MatMul weights are "
            f"quantized alone: export the model at opset {EMBEDDINGS_OPSET} to store its tables too, or "
            "leave out weight_only.embeddings"
        )
    model.CopyFrom(converted)
    return [f"opset {opset} converted to {EMBEDDINGS_OPSET}: 4-bit embedding tables need it"], None


def _import_contrib_opset(model: Any) -> None:
    """The com.microsoft opset import that MatMulNBits and GatherBlockQuantized need (ONNX Runtime's
    quantizers add it in their own paths, not in every one)."""
    from onnx import helper

    uses = any(node.domain == "com.microsoft" for node in model.graph.node)
    if uses and not any(entry.domain == "com.microsoft" for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _load_error(path: Path) -> str | None:
    """Why ONNX Runtime's CPU provider refuses to load the model (its text, without the file's path),
    or None: the check a model with 4-bit tables passes before it is kept."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        text = str(exc)
        text = text.split(" failed:", 1)[1] if " failed:" in text else text.replace(str(path), path.name)
        return f"{type(exc).__name__}: {' '.join(text.split())[:300]}"
    return None


def _set_accuracy_level(model: Any, level: int) -> None:
    """MatMulNBits' accuracy_level on every such node (HQQ and GPTQ do not write it); 0 leaves the
    attribute out, as ONNX Runtime's own quantizer does (most execution providers reject it)."""
    from onnx import helper

    if not level:
        return
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            kept = [attribute for attribute in node.attribute if attribute.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])
