#!/usr/bin/env bash
# Everything pxpo checks and times on a GPU, as one script with a wall-clock deadline (a lent GPU
# session is short): build the extension, run the GPU kernel tests, time the ops, time the trainer,
# and time TRL 0.23's DDPOTrainer at the same settings in the same session.
#
#   OUT=/tmp/gpu DEADLINE_S=580 bash benchmarks/gpu_checks.sh
#
# Optional: wheels in .whl/ (diffusers, trl) are installed to /tmp/site first; TRL_ANCHOR=path runs
# that anchor script; PRETRAIN_ARGS="..." trains the embedded model in the background during the
# build and tests (python/pretrain_tiny.py), before any timing starts; ONLY="stage names" runs
# just those stages (build kernel-tests bench-ops bench-variants bench-microstep bench-compiled
# bench-trainer trl-anchor bench-scaling); OPS_BATCHES and TRAINER_ARGS change those benchmarks' sizes and options.
# Results land in $OUT: session.log, ops.csv, trainer.csv, trl.json, and tiny-gpu.tar when
# pretraining ran.
set -u
OUT=${OUT:-/tmp/pxpo-gpu}
DEADLINE_S=${DEADLINE_S:-580}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/session.log"

log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# stage NAME CAP RESERVE CMD...: run CMD for at most CAP seconds, leaving RESERVE seconds of the deadline
# for the stages after it; skipped when under 15 s remain.
stage() {
  local name=$1 cap=$2 reserve=$3; shift 3
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return 0; fi
  local left=$(( DEADLINE_S - ($(date +%s) - START) - reserve ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 15 )); then log "SKIP $name (only ${left}s left)"; return 0; fi
  log "START $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  log "END $name rc=$rc"
  return 0
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -2
  python3 -c "import torch, triton, diffusers, transformers, accelerate, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
} >>"$LOG" 2>&1

PRETRAIN_PID=
if [[ -n "${PRETRAIN_ARGS:-}" ]]; then
  log "START pretrain (background): $PRETRAIN_ARGS"
  # shellcheck disable=SC2086
  (python3 python/pretrain_tiny.py $PRETRAIN_ARGS --out /tmp/tiny-gpu >"$OUT/pretrain.log" 2>&1;
   echo "pretrain rc=$?" >>"$OUT/pretrain.log"
   # the log travels inside the tar when there is a model folder, else on its own
   if [[ -d /tmp/tiny-gpu ]]; then mv "$OUT/pretrain.log" /tmp/tiny-gpu/ && tar -C /tmp -cf "$OUT/tiny-gpu.tar" tiny-gpu; fi) &
  PRETRAIN_PID=$!
fi

# Caps and reserves (seconds) follow the priorities: the kernel tests, the op timings, the trainer's epochs
# and TRL's anchor each keep their time even when an earlier stage runs long; the scaling sweep gets what is left.
stage build 180 400 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PXPO_FORCE_CUDA=1 \
  python3 -m pip install --no-build-isolation --no-deps -e .
stage kernel-tests 110 340 env PXPO_REQUIRE_NATIVE=1 python3 -m pytest -q -n 8 -p no:cacheprovider \
  tests/test_ops.py tests/test_native.py tests/test_triton.py tests/test_fuzz.py -k "cuda or triton"

if [[ -n "$PRETRAIN_PID" ]]; then  # no timing while the GPU trains something else
  log "waiting for pretrain"; wait "$PRETRAIN_PID"; log "pretrain done"
fi

# shellcheck disable=SC2086
stage bench-ops 90 280 python3 benchmarks/bench_ops.py --device cuda --batch ${OPS_BATCHES:-16 128 1024 4096} \
  --min-time 0.05 --out "$OUT/ops.csv"
# shellcheck disable=SC2086
stage bench-variants 60 250 python3 benchmarks/bench_trainer.py --benches microstep variants --out "$OUT/trainer.csv"
# Eager against compiled UNet (the trainer's compile_unet): micro-steps of both algorithms, then whole epochs.
stage bench-microstep 60 330 python3 benchmarks/bench_trainer.py --benches microstep --reps 20 --out "$OUT/trainer.csv"
stage bench-compiled 300 140 python3 benchmarks/bench_trainer.py --compile default --benches microstep epoch --reps 20 \
  --epochs 3 --ddpo-epochs 0 --out "$OUT/trainer.csv"
# shellcheck disable=SC2086
stage bench-trainer 130 170 python3 benchmarks/bench_trainer.py --benches microstep epoch --ddpo-epochs 0 \
  ${TRAINER_ARGS:-} --out "$OUT/trainer.csv"
if [[ -n "${TRL_ANCHOR:-}" ]]; then
  stage trl-anchor 185 0 sh -c "python3 '$TRL_ANCHOR' > '$OUT/trl.json'"
  [[ -s "$OUT/trl.json" ]] && log "trl: $(tail -c 400 "$OUT/trl.json")"
fi
stage bench-scaling 120 0 python3 benchmarks/bench_trainer.py --benches scaling --scaling-batches 1 4 16 \
  --scaling-sizes 768 --out "$OUT/trainer.csv"
log "done"
