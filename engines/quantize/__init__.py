"""Stage 3, quantize: INT8 as QDQ ONNX (`int8`), FP16 (`fp16`), the per-layer error report
(`layer_errors`) and the accuracy-budget search (`budget`).
"""
