# Sourced by the bench/run_gpu*.sh scripts on the GPU machine (repo root): installs the carried
# wheels (.whl: soundfile, soxr, ...) into /tmp/site, points PYTHONPATH at src/, the shared
# fixtures at .carry/shared and the tests at CUDA, creates $OUT and records the GPU.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export SPEECHRT_SHARED=$PWD/.carry/shared SPEECHRT_TEST_DEVICE=cuda
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
