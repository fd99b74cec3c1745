#!/usr/bin/env bash
# One device call: GPU tests, then the Conformer benchmark. Run from the repo root on the GPU
# machine with .whl (soundfile, soxr wheels) and .carry (shared fixtures, LibriSpeech flacs):
#   bash bench/run_gpu.sh [extra speechrt bench args]
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export SPEECHRT_SHARED=$PWD/.carry/shared SPEECHRT_TEST_DEVICE=cuda
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" -x \
    tests/engine tests/kernels 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
fi
python3 -m speechrt.cli.main bench conformer --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -80
