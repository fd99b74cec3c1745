#!/usr/bin/env bash
# One device call: GPU tests, then the Conformer benchmark. Run from the repo root on the GPU
# machine with .whl (soundfile, soxr wheels) and .carry (shared fixtures, LibriSpeech flacs):
#   bash bench/run_gpu.sh [extra speechrt bench args]
set -uo pipefail
source bench/gpu_env.sh
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" -x \
    tests/engine tests/kernels 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
fi
python3 -m speechrt.cli.main bench conformer --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -80
