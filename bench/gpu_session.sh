#!/usr/bin/env bash
# One prepared command for a GPU machine lent for a few minutes (see README, "GPU"): install the
# carried wheels, print the GPU, run the gpu-marked tests, then the GPU benchmark. Run from the
# repository root; everything it writes goes to ${OUT:-bench/results}.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:$PWD/sdk${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu-smi.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_backends.py 2>&1 | tee "$OUT/gpu-tests.txt"
tests_status=${PIPESTATUS[0]}
timeout 480 python3 -m bench.gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu-bench.txt"
bench_status=${PIPESTATUS[0]}
echo "gpu tests exit $tests_status, bench exit $bench_status"
exit $(( tests_status || bench_status ))
