"""Quantization-aware training: fake-quantized fine-tuning with distillation, exported as QDQ ONNX."""
