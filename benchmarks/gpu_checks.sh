#!/usr/bin/env bash
# Everything pxpo checks and times on a GPU, as one script with a wall-clock deadline (a lent GPU
# session is short): build the extension, run the GPU kernel tests, time the ops, time the trainer,
# and time TRL 0.23's DDPOTrainer at the same settings in the same session.
#
#   OUT=/tmp/gpu DEADLINE_S=580 bash benchmarks/gpu_checks.sh
#
# STAGES="names" picks the stages and their order. The stages: build kernel-tests bench-ops
# bench-variants bench-microstep bench-kl bench-compiled bench-reduce-overhead bench-compiled-blocks bench-trainer
# trl-anchor bench-scaling bench-sdxl; unset, all but bench-reduce-overhead, bench-compiled-blocks, bench-kl and
# bench-sdxl in that order; empty, none (e.g. to only pretrain). Each stage has a cap and a need (seconds, NEED_OF below): it
# runs for at most its cap, never into the needs of the stages after it, and is skipped when less than its
# own need is left. Optional: wheels in .whl/ (diffusers, trl) are installed to /tmp/site first; TRL_ANCHOR=path
# is the anchor script the trl-anchor stage runs; PRETRAIN_ARGS="..." trains the embedded model
# (python/pretrain_tiny.py) in the background during build and kernel-tests, and the first other
# stage waits for it, so nothing is timed while it trains; OPS_BATCHES and TRAINER_ARGS change those
# benchmarks' sizes and options; COMPILED_BENCHES="epoch" makes the compiled stages time whole epochs only (a cold
# compiled micro-step bench and then whole epochs did not fit in 294 s on an H100 beside TRL).
# Results land in $OUT: session.log, ops.csv, trainer.csv, trl.json,
# and, when pretraining ran, tiny-gpu.tar.part00, part01, ... (the pipeline folder as a tar cut into
# 15 MB pieces, since a lent machine returns no file over 16 MB: `cat tiny-gpu.tar.part* | tar -x`).
set -u
OUT=${OUT:-/tmp/pxpo-gpu}
DEADLINE_S=${DEADLINE_S:-580}
STAGES=${STAGES-build kernel-tests bench-ops bench-variants bench-microstep bench-compiled bench-trainer trl-anchor bench-scaling}
# The least time (seconds) worth starting each stage with: a stage cut short measures nothing.
declare -A NEED_OF=([build]=60 [kernel-tests]=40 [bench-ops]=40 [bench-variants]=40 [bench-microstep]=40 [bench-kl]=40
  [bench-compiled]=170 [bench-reduce-overhead]=170 [bench-compiled-blocks]=120 [bench-trainer]=100 [trl-anchor]=190 [bench-scaling]=40
  [bench-sdxl]=150)
for name in $STAGES; do
  [[ -n "${NEED_OF[$name]:-}" ]] || { echo "unknown stage '$name' (known: ${!NEED_OF[*]})" >&2; exit 2; }
done
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/session.log"

log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# stage NAME CAP CMD...: run CMD for at most CAP seconds, leaving the need of every stage still to come in
# $STAGES; skipped when less than its own need is left.
stage() {
  local name=$1 cap=$2 need=${NEED_OF[$1]}; shift 2
  local later=0 seen=0 s
  for s in $STAGES; do
    if (( seen )); then later=$(( later + ${NEED_OF[$s]:-0} )); fi
    [[ $s == "$name" ]] && seen=1
  done
  local left=$(( DEADLINE_S - ($(date +%s) - START) - later ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < need )); then log "SKIP $name (${left}s left of the ${need}s it needs)"; return 0; fi
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
  PRETRAIN_DIR=$(mktemp -d)
  # From the checkout: it starts before the build stage has installed pxpo (it needs no native code).
  # shellcheck disable=SC2086
  (PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python3 python/pretrain_tiny.py $PRETRAIN_ARGS --out "$PRETRAIN_DIR/tiny-gpu" \
     >"$OUT/pretrain.log" 2>&1;
   echo "pretrain rc=$?" >>"$OUT/pretrain.log"
   # the log travels inside the tar when there is a model folder, else on its own
   if [[ -d $PRETRAIN_DIR/tiny-gpu ]]; then
     mv "$OUT/pretrain.log" "$PRETRAIN_DIR/tiny-gpu/" \
       && tar -C "$PRETRAIN_DIR" -cf - tiny-gpu | split -b 15m -d - "$OUT/tiny-gpu.tar.part"
   fi
   rm -rf "$PRETRAIN_DIR") &
  PRETRAIN_PID=$!
fi

# Each stage's function; the loop at the end runs them in the order of $STAGES with their caps.
run_build() {
  env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PXPO_FORCE_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e .
}
run_kernel_tests() {  # the overflow guard's CUDA kernels included (tests/test_numerical_guards.py)
  env PXPO_REQUIRE_NATIVE=1 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_ops.py tests/test_native.py \
    tests/test_triton.py tests/test_fuzz.py tests/test_numerical_guards.py -k "cuda or triton"
}
run_bench_ops() {
  # shellcheck disable=SC2086
  python3 benchmarks/bench_ops.py --device cuda --batch ${OPS_BATCHES:-16 128 1024 4096} --min-time 0.05 --kernels \
    --out "$OUT/ops.csv"
}
run_bench_variants() { python3 benchmarks/bench_trainer.py --benches microstep variants --out "$OUT/trainer.csv"; }
# Eager against compiled UNet (the trainer's compile_unet): micro-steps of both algorithms, then whole epochs;
# a compiled run first records the compiled gradient against the eager one (the gradcheck row).
run_bench_microstep() { python3 benchmarks/bench_trainer.py --benches microstep --reps 20 --out "$OUT/trainer.csv"; }
run_bench_kl() {
  # shellcheck disable=SC2086
  python3 benchmarks/bench_trainer.py --benches kl --reps 10 ${TRAINER_ARGS:-} --out "$OUT/trainer.csv"
}
run_compiled() {  # MODE [bench_trainer options]
  # shellcheck disable=SC2086
  python3 benchmarks/bench_trainer.py --compile "$@" --benches ${COMPILED_BENCHES:-microstep epoch} --reps 20 --epochs 3 \
    --ddpo-epochs 0 --out "$OUT/trainer.csv"
}
run_bench_trainer() {
  # shellcheck disable=SC2086
  python3 benchmarks/bench_trainer.py --benches microstep epoch --ddpo-epochs 0 ${TRAINER_ARGS:-} --out "$OUT/trainer.csv"
}
run_trl_anchor() {
  if [[ -z "${TRL_ANCHOR:-}" ]]; then echo "TRL_ANCHOR is not set"; return 1; fi
  python3 "$TRL_ANCHOR" >"$OUT/trl.json" && log "trl: $(tail -c 400 "$OUT/trl.json")"
}
# SDXL's architecture with random weights at 1024 px: that it trains at scale (fp16, the VAE upcast), its
# micro-step and a short epoch (20 steps, 4 samples), and the peak memory.
run_bench_sdxl() {
  python3 benchmarks/bench_trainer.py --sdxl --benches microstep epoch --epochs 2 --ddpo-epochs 0 --reps 10 \
    --out "$OUT/trainer.csv"
}
run_bench_scaling() {
  python3 benchmarks/bench_trainer.py --benches scaling --scaling-batches 1 4 16 --scaling-sizes 768 --out "$OUT/trainer.csv"
}
export -f run_build run_kernel_tests run_bench_ops run_bench_variants run_bench_microstep run_bench_kl run_compiled \
  run_bench_trainer run_trl_anchor run_bench_scaling run_bench_sdxl log
export OUT START LOG

for name in $STAGES; do
  if [[ -n "$PRETRAIN_PID" && $name != build && $name != kernel-tests ]]; then  # no timing while the GPU trains
    log "waiting for pretrain"; wait "$PRETRAIN_PID"; PRETRAIN_PID=; log "pretrain done"
  fi
  case $name in
    build) stage build 180 bash -c run_build ;;
    kernel-tests) stage kernel-tests 110 bash -c run_kernel_tests ;;
    bench-ops) stage bench-ops 90 bash -c run_bench_ops ;;
    bench-variants) stage bench-variants 60 bash -c run_bench_variants ;;
    bench-microstep) stage bench-microstep 60 bash -c run_bench_microstep ;;
    bench-kl) stage bench-kl 60 bash -c run_bench_kl ;;
    bench-compiled) stage bench-compiled 360 bash -c "run_compiled default" ;;
    bench-reduce-overhead) stage bench-reduce-overhead 300 bash -c "run_compiled reduce-overhead" ;;
    bench-compiled-blocks) stage bench-compiled-blocks 300 bash -c "run_compiled default --compile-scope blocks" ;;
    bench-trainer) stage bench-trainer 130 bash -c run_bench_trainer ;;
    trl-anchor) stage trl-anchor 200 bash -c run_trl_anchor ;;
    bench-scaling) stage bench-scaling 200 bash -c run_bench_scaling ;;
    bench-sdxl) stage bench-sdxl 240 bash -c run_bench_sdxl ;;
  esac
done
if [[ -n "$PRETRAIN_PID" ]]; then log "waiting for pretrain"; wait "$PRETRAIN_PID"; fi
log "done"
