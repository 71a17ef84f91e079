"""FP16: a float16 copy of the model with float32 inputs and outputs, for targets with half kernels."""

from __future__ import annotations

from pathlib import Path

from engines.errors import EngineError


def convert_fp16(model_path: Path, out_path: Path) -> Path:
    """A float16 model with float32 inputs and outputs, so callers do not change."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True)
    except Exception as exc:
        raise EngineError(
            f"FP16 conversion failed: {type(exc).__name__}: {exc}", code="quantization_failed"
        ) from exc
    onnx.save_model(model, str(out_path))
    return out_path
