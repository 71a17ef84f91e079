# optiforge API and worker image. The same image runs `optiforge serve` and `optiforge worker`.
# GPU workers build it with `--build-arg GPU=1` (docker-compose's gpu-worker does): torch from
# PyTorch's CUDA index and TensorRT from NVIDIA's (both need the network at build time only).
FROM python:3.11-slim
ARG GPU=0
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu130

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OPTIFORGE_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY engines ./engines
COPY migrations ./migrations
COPY sdk ./sdk
# The SDK is installed from sdk/ (the server shares its tensor codec). The prune extra brings torch (CPU build pinned in pyproject.toml) and torch-pruning; onnx2torch
# goes in without its torchvision requirement (see engines/torch_bridge.py).
RUN pip install ./sdk '.[prune,openvino]' \
    && pip install --no-deps onnx2torch==1.5.15 \
    && if [ "$GPU" = "1" ]; then \
         pip install --force-reinstall --no-deps torch==2.13.0 --index-url "$TORCH_CUDA_INDEX" \
         && pip install tensorrt-cu13; \
       fi \
    && useradd --create-home --uid 1000 optiforge \
    && mkdir -p /data && chown optiforge /data

USER optiforge
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
# Listening on 0.0.0.0 needs an API key: run with -e OPTIFORGE_BOOTSTRAP_API_KEY=<32+ random
# characters> (made the default project's admin key on first start), or create one first with
# `optiforge keys create` against the same database; without either, serve refuses to start.
CMD ["optiforge", "serve", "--host", "0.0.0.0", "--port", "8000"]
