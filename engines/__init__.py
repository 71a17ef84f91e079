"""The optimization core: a plain library (no FastAPI, no Celery, no SQL).

Every stage reads an ONNX file and writes one, except compile, which writes what a backend runs.
Heavy libraries (onnxruntime, torch, tensorrt) are imported inside the functions that need them.
"""
