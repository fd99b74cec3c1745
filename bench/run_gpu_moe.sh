#!/usr/bin/env bash
# One device call for issue 5 (< 8 min): the GPU tests of the Conformer-MoE path (fused engine,
# kernels, dense engine regression, bench smoke), then `speechrt bench moe` into $OUT. Run from
# the repo root on the GPU machine, carrying .whl and .carry/shared as for bench/run_gpu.sh:
#   OUT=$OUT bash bench/run_gpu_moe.sh [extra `speechrt bench moe` args]
# The bench rewrites moe.md/.csv/.json after every step, so its time-out keeps what it measured.
set -uo pipefail
source bench/gpu_env.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" -rfEs \
  tests/models/conformer_moe tests/benchmark/test_moe_bench.py tests/kernels/test_moe.py \
  tests/engine > "$OUT/gpu_tests.log" 2>&1
tail -30 "$OUT/gpu_tests.log"
timeout 290 python3 -m speechrt.cli.main bench moe --out "$OUT" "$@" > "$OUT/bench.log" 2>&1
tail -15 "$OUT/bench.log"
