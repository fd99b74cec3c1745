#!/usr/bin/env bash
# speechrt's small default English model, end to end:
#   0 data (espeak-ng synthesis + augmentation + fbank)  1 training  2 averaging + export
#   3 evaluation on the held-out synthetic test set (+ the LibriSpeech subset when readable)
#
#   recipes/synthetic_en/run.sh                      # full recipe (~15 min on one H200, 16 cores)
#   NUM_TRAIN_UTTS=200 NUM_TEST_UTTS=500 STEPS=20 PRESET=tiny DEVICE=cpu recipes/synthetic_en/run.sh
#
# Settings (environment): OUT_DIR, NUM_TRAIN_UTTS, NUM_DEV_UTTS, NUM_TEST_UTTS (>= 500 for the
# real test set), STEPS (max optimizer steps), TIME_BUDGET_MIN (training minutes, 0 = steps only),
# DEVICE (auto|cpu|cuda), PRESET (default|tiny), WORKERS, TRAIN_OPTS (more train.py options,
# e.g. --pause-after-min 7 / --resume for a machine with a per-command time limit), DEB_DIR (.deb files from fetch_debs.sh,
# used when espeak-ng is not installed), AVERAGE, CKPT_DTYPE, STAGE / STOP_STAGE, PY.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT_DIR=${OUT_DIR:-out/synthetic_en}
NUM_TRAIN_UTTS=${NUM_TRAIN_UTTS:-60000}
NUM_DEV_UTTS=${NUM_DEV_UTTS:-300}
NUM_TEST_UTTS=${NUM_TEST_UTTS:-500}
STEPS=${STEPS:-100000}
TIME_BUDGET_MIN=${TIME_BUDGET_MIN:-12}
DEVICE=${DEVICE:-auto}
PRESET=${PRESET:-default}
WORKERS=${WORKERS:-$(nproc)}
DEB_DIR=${DEB_DIR:-$repo/.carry/debs}
AVERAGE=${AVERAGE:-5}
CKPT_DTYPE=${CKPT_DTYPE:-fp16}
STAGE=${STAGE:-0}
STOP_STAGE=${STOP_STAGE:-3}
DECODE_OPTS=${DECODE_OPTS:---method attention_rescoring --ctc-weight 0.5 --reverse-weight 0.3}

export PYTHONPATH="$repo/src:$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
data=$OUT_DIR/data
exp=$OUT_DIR/exp
model=$OUT_DIR/model
mkdir -p "$OUT_DIR"
timings=()

run_stage() {  # run_stage <number> <name> <command...>
  local n=$1 name=$2
  shift 2
  if [ "$n" -lt "$STAGE" ] || [ "$n" -gt "$STOP_STAGE" ]; then return 0; fi
  echo "=== stage $n: $name"
  local t0 ms
  t0=$(date +%s%N)
  "$@"
  ms=$((($(date +%s%N) - t0) / 1000000))
  timings+=("$(printf 'stage %d %-7s %6d.%d s' "$n" "$name" $((ms / 1000)) $((ms % 1000 / 100)))")
  echo "${timings[${#timings[@]}-1]}"
}

eval_list() {  # eval_list <wav.scp> <text> <report.json>
  local device_opt=()
  [ "$DEVICE" = auto ] || device_opt=(--device "$DEVICE")
  # shellcheck disable=SC2086
  if "$PY" -c "import soundfile, soxr" 2>/dev/null; then
    "$PY" -m speechrt.cli.main eval --model "$model" --data "$1" --text "$2" \
      $DECODE_OPTS ${device_opt[@]+"${device_opt[@]}"} --report "$3"
  else  # no soundfile/soxr here: the recipe's standard-library WAV reader, same decoding
    "$PY" -m recipes.synthetic_en.evaluate --model "$model" --data "$1" --text "$2" \
      $DECODE_OPTS ${device_opt[@]+"${device_opt[@]}"} --report "$3"
  fi
}

evaluate() {
  eval_list "$data/test/wav.scp" "$data/test/text" "$OUT_DIR/eval_test.json"
  local libri=${SPEECHRT_SHARED:-$repo/../shared}/assets/librispeech_test_clean_subset
  if [ -f "$libri/trans.txt" ] && "$PY" -c "import soundfile, soxr" 2>/dev/null; then
    echo "--- real speech (LibriSpeech test-clean subset; out of domain, for information)"
    sed "s|^\([^ ]*\).*|\1 $libri/audio/\1.flac|" "$libri/trans.txt" > "$OUT_DIR/libri_wav.scp"
    eval_list "$OUT_DIR/libri_wav.scp" "$libri/trans.txt" "$OUT_DIR/eval_librispeech.json"
  fi
}

run_stage 0 data "$PY" -m recipes.synthetic_en.prepare_data --out "$data" \
  --num-train "$NUM_TRAIN_UTTS" --num-dev "$NUM_DEV_UTTS" --num-test "$NUM_TEST_UTTS" \
  --workers "$WORKERS" --deb-dir "$DEB_DIR"
run_stage 1 train "$PY" -m recipes.synthetic_en.train --data "$data" --exp "$exp" \
  --preset "$PRESET" --steps "$STEPS" --time-budget-min "$TIME_BUDGET_MIN" --device "$DEVICE" \
  --average "$AVERAGE" ${TRAIN_OPTS:-}
run_stage 2 export "$PY" -m recipes.synthetic_en.export --exp "$exp" --out "$model" \
  --average "$AVERAGE" --dtype "$CKPT_DTYPE"
run_stage 3 eval evaluate

echo "=== timings"
printf '%s\n' ${timings[@]+"${timings[@]}"}
echo "model: $model"
