#!/usr/bin/env bash
# One-call GPU acceptance and measurement pass for ONE GPU, built so that no finished figure is lost.
#   bash benchmarks/gpu_suite.sh              # on a GPU machine: needs torch, timm, tensorboard; DALI optional
#   bash benchmarks/gpu_suite.sh --rehearse   # the same plumbing on CPU with tiny shapes (CI runs this)
#   SUITE_ONLY=vit_large bash benchmarks/gpu_suite.sh   # one part again (<= 150 s); names in PARTS below
# Parts, in this order, each under its own timeout and skipped when the budget (SUITE_BUDGET_S) runs short:
#   preflight   versions, GPU, /dev/shm; builds the ViT-L pair and runs one bf16 step (stops the suite if it fails)
#   gemm        the bf16 GEMM ceiling measured here (8192^3, 3 warm-up, 10 timed): MFU's honest denominator
#   vit_large   the Mugs step, ViT-L/16 at 16 per GPU: optimised bf16 vs paper-style strict fp32 and TF32
#   train_e2e   train_fsdp.py ViT-S/16 bf16 + compile on JPEGs made here, SIGKILLed after the step-10
#               checkpoint and resumed to step 30
#   vit_small, vit_base   the step at the Table-1 batches (64, 42)
#   vit_large_compile     the optimised ViT-L step again with --compile (graphs compiled, any eager fall-back)
#   dali_loader the DALI loader (4 x 224 + 10 x 96 crops) at batch 16/64/128, new and old (benchmarks/legacy_dali)
#               in the same call; a decode-only ceiling; ViT-S at 64/GPU fed by the loader vs synthetic batches
#   profile     where the time goes (benchmarks/profile_step.py, profile.jsonl): torch.profiler over 3 steps of
#               ViT-L at 16 and 64 per GPU in the default (eager) and the best (compiled) mode, at 16 eager with
#               --cuda_graphs (`graphed`), a batch sweep 16/32/64 (MFU), and the depth-24 step at tiny width
#               (the host floor). ONLY as SUITE_ONLY=profile
#               (budget 560 s: one <= 590 s device call of its own; a full run skips it)
# After EVERY part, when $OUT is set, $OUT holds the run's JSONL records, summary.md and logs.tar.gz
# (<= 7 files, no folder), each replaced atomically: a kill at any minute keeps every finished part.
# The run's own folder is runs/gpu_suite/<time>-<device>/ (ignored by git; committing results is on purpose).
# The interpreter is $PYTHON, else python3 or python, whichever imports torch. `mugs` need not be installed:
# this checkout is installed into a temp dir (pip --target, no index) or mapped there by symlinks.
# DALI from copied wheels: DALI_WHEELS=DIR (benchmarks/README.md, "DALI without a package index").
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)
PARTS="preflight gemm vit_large train_e2e vit_small vit_base vit_large_compile dali_loader profile"
err() { echo "gpu_suite: error: $*" >&2; exit 2; }

REHEARSE=0
case "${1:-}" in
  "") ;;
  --rehearse) REHEARSE=1 ;;
  *) err "unknown argument '$1' (usage: bash benchmarks/gpu_suite.sh [--rehearse])" ;;
esac
ONLY=${SUITE_ONLY:-}
[ -z "$ONLY" ] || [[ " $PARTS " == *" $ONLY "* ]] || err "SUITE_ONLY=$ONLY is not a part; parts: $PARTS"
BUDGET=${SUITE_BUDGET_S:-$(case "$ONLY" in "") echo 520 ;; profile) echo 560 ;; dali_loader) echo 420 ;; *) echo 150 ;; esac)}

# ---------------------------------------------------------------- 0. an interpreter with torch, a GPU, or stop at once
PY=""
for c in ${PYTHON:-} python3 python; do
  if command -v "$c" >/dev/null && "$c" -c "import torch" 2>/dev/null; then PY=$c; break; fi
  [ -n "${PYTHON:-}" ] && [ "$c" = "$PYTHON" ] && err "PYTHON=$PYTHON cannot import torch"
done
[ -n "$PY" ] || err "neither python3 nor python imports torch here (set PYTHON=/path/to/python)"
if [ $REHEARSE = 1 ]; then
  GPU="CPU rehearsal"
else
  GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
  [ -n "$GPU" ] || err "no CUDA GPU visible (torch.cuda.is_available() is False): nothing measured; run this on a GPU machine, or --rehearse"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/mugs_gpu_suite.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
SLUG=$(echo "$GPU" | tr -cs 'A-Za-z0-9' '_' | sed 's/_$//')
RUN_DIR=${SUITE_RUN_DIR:-$ROOT/runs/gpu_suite/$(date -u +%Y%m%d-%H%M%S)-$SLUG}
mkdir -p "$RUN_DIR/logs"
exec > >(tee -a "$RUN_DIR/logs/suite.log") 2>&1
echo "gpu_suite: $GPU; python: $(command -v "$PY"); run folder $RUN_DIR${OUT:+; published to $OUT after every part}"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# ---------------------------------------------------------------- shapes: the real ones, or tiny ones on CPU
if [ $REHEARSE = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  TINY=(--preset tiny)  # the tests' model (configs/presets.py); the flags after it override it
  L_ARGS=("${TINY[@]}" --batch_size_per_gpu 4 --drop_path_rate 0.3 --compare --baselines fp32,tf32)
  S_ARGS=("${TINY[@]}" --batch_size_per_gpu 4)
  LC_ARGS=("${TINY[@]}" --batch_size_per_gpu 4 --drop_path_rate 0.3 --compile true --compile_backend eager)
  B_ARGS=("${TINY[@]}" --batch_size_per_gpu 2)
  STEPS=(--steps 2 --warmup 1)
  GEMM=(--device cpu --size 256 --dtype fp32 --reps 3)
  TRAIN=("${TINY[@]}" --compile false --batch_size_per_gpu 4)
  LOADER=(--device cpu --images 48 --batches 2 --warmup 1 --global-size 32 --local-size 16 --local-crops 2 --workers 1)
  LOADER_BATCHES="8 16" IMAGES=64 WORKERS_MAX=2 FED_BATCH=8
  FED=("${TINY[@]}" --batch_size_per_gpu 8 --max_steps 6 --epochs 2 --warmup_epochs 1 --num_workers 1)
  FED_STEP=("${TINY[@]}" --batch_size_per_gpu 8)
  P_ARGS=("${TINY[@]}" --drop_path_rate 0.3) P_BATCHES="2 4" P_SWEEP="3" P_BEST=(--compile true --compile_backend eager)
  P_GRAPHED=""  # --cuda_graphs needs CUDA: no graphed run in the CPU rehearsal
  P_FLOOR=("${TINY[@]}" --depth 24 --batch_size_per_gpu 2) P_STEPS=(--steps 1 --warmup 1 --profile_steps 2)
else
  # the Table-1 runs' shapes, per-GPU batches and drop path (configs/table1.py, via their presets)
  L_ARGS=(--preset vit_large_250ep --compare --baselines fp32,tf32)
  S_ARGS=(--preset vit_small_100ep)
  LC_ARGS=(--preset vit_large_250ep --compile true)
  B_ARGS=(--preset vit_base_400ep)
  STEPS=(--steps 10 --warmup 3)
  GEMM=(--size 8192 --dtype bf16 --reps 10 --warmup 3)
  TRAIN=(--device cuda --precision bf16 --compile true --arch vit_small --batch_size_per_gpu 32)
  LOADER=(--device gpu --images 6000 --batches 50 --warmup 3)  # 4 x 224 + 10 x 96 crops, ImageNet-like sizes
  LOADER_BATCHES="16 64 128" IMAGES=6000 WORKERS_MAX=8 FED_BATCH=64
  FED=(--preset vit_small_100ep --device cuda --precision bf16 --max_steps 60 --epochs 2 --warmup_epochs 1 --num_workers 16)
  FED_STEP=(--preset vit_small_100ep)
  P_ARGS=(--preset vit_large_250ep) P_BATCHES="16 64" P_SWEEP="32" P_BEST=(--compile true)
  P_GRAPHED="16"  # eager + --cuda_graphs (training/cuda_graphs.py): off by default until this measures it
  P_FLOOR=(--preset vit_large_250ep --arch custom --embed_dim 64 --depth 24 --num_heads 1 --batch_size_per_gpu 16)
  P_STEPS=(--steps 5 --warmup 3 --profile_steps 3)
fi

# ---------------------------------------------------------------- publishing: after every part, atomically
status() { echo "$*" >>"$RUN_DIR/status.txt"; echo "== $*"; }
publish() {
  "$PY" -m mugs.benchmarks.gpu_summary table --run_dir "$RUN_DIR" >"$RUN_DIR/summary.md" 2>>"$RUN_DIR/logs/suite.log"
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  local f
  for f in "$RUN_DIR"/*.jsonl "$RUN_DIR/summary.md"; do
    [ -f "$f" ] && cp "$f" "$OUT/.publishing" && mv -f "$OUT/.publishing" "$OUT/$(basename "$f")"
  done
  tar -czf "$OUT/.publishing" -C "$RUN_DIR" logs && mv -f "$OUT/.publishing" "$OUT/logs.tar.gz"
}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# part NAME LIMIT MIN FUNCTION: runs FUNCTION with T = its timeout (LIMIT, or what is left), then publishes
part() {
  local name=$1 limit=$2 min=$3 fn=$4 rem
  [ -z "$ONLY" ] || [ "$ONLY" = "$name" ] || return 0
  rem=$(left)
  echo "[t=$(( $(date +%s) - START ))s] $name"
  if [ "$rem" -lt "$min" ]; then status "$name: skipped (${rem}s of the ${BUDGET}s budget left)"; publish; return 0; fi
  T=$(( limit < rem - 5 ? limit : rem - 5 ))
  "$fn" "$name"
  publish
}

# ---------------------------------------------------------------- this checkout as `mugs`, DALI if given
SITE=$TMP/site
mkdir -p "$SITE" "$TMP/src"
PKG_DIRS="model pipeline training configs eval core benchmarks apps"  # setup.py's PACKAGES
for d in setup.py $PKG_DIRS; do cp -r "$ROOT/$d" "$TMP/src/" || err "cannot copy $ROOT/$d"; done
rm -rf "$TMP/src/benchmarks/results"
if "$PY" -m pip install -q --no-deps --no-index --no-build-isolation --target "$SITE" "$TMP/src" >"$RUN_DIR/logs/install.log" 2>&1; then
  HOW="pip install --target (this checkout)"
else  # no pip/setuptools able to build offline: map the package folders by symlinks, as setup.py names them
  rm -rf "$SITE" && mkdir -p "$SITE/mugs" && touch "$SITE/mugs/__init__.py"
  for d in $PKG_DIRS; do ln -s "$ROOT/$d" "$SITE/mugs/$d"; done
  HOW="symlinks to this checkout (pip could not build offline: logs/install.log says why)"
fi
PATHS=$SITE
if [ -n "${DALI_WHEELS:-}" ] && ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
  # a directory of wheels (DALI + the dependencies this machine lacks), or the pieces of a split tarball of one
  WHEELS=$DALI_WHEELS
  if ls "$DALI_WHEELS"/*.part-* >/dev/null 2>&1; then
    mkdir -p "$TMP/wheels" && cat "$DALI_WHEELS"/*.part-* | tar -x -C "$TMP/wheels" \
      && WHEELS=$(dirname "$(find "$TMP/wheels" -name 'nvidia_dali*.whl' | head -1)")
  fi
  if "$PY" -m pip install -q --no-index --no-deps --target "$TMP/dali" "$WHEELS"/*.whl >>"$RUN_DIR/logs/install.log" 2>&1; then
    PATHS=$PATHS:$TMP/dali
  else
    echo "gpu_suite: DALI wheels in $WHEELS did not install (see logs/install.log); going on without DALI"
  fi
fi
export PYTHONPATH="$PATHS${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import mugs.training.step, mugs.benchmarks.step, mugs.apps" \
  || { status "install: cannot import mugs from $SITE"; publish; err "cannot import mugs from $SITE (see $RUN_DIR/logs/install.log)"; }
DALI=$("$PY" -c "import nvidia.dali; print(nvidia.dali.__version__)" 2>/dev/null)
echo "mugs: $HOW; DALI: ${DALI:-not importable (torchvision loader; dali_loader skipped)}"
nvidia-smi >"$RUN_DIR/logs/nvidia-smi.txt" 2>&1

# ---------------------------------------------------------------- the parts
preflight() {
  echo "== preflight (timeout ${T}s): python -m mugs.benchmarks.preflight ${L_ARGS[*]}"
  timeout --kill-after=5 "$T" "$PY" -m mugs.benchmarks.preflight "${L_ARGS[@]}" --out "$RUN_DIR/env.jsonl" \
    >"$RUN_DIR/logs/preflight.log" 2>&1
  local rc=$?
  head -1 "$RUN_DIR/logs/preflight.log"
  if [ $rc -ne 0 ]; then
    status "preflight: FAILED (exit $rc): $(grep -m1 'preflight: FAILED' "$RUN_DIR/logs/preflight.log" || tail -1 "$RUN_DIR/logs/preflight.log")"
    publish
    echo "gpu_suite: preflight failed: every later part would fail the same way; stopping (logs/preflight.log)" >&2
    exit 3
  fi
  status "preflight: ok"
}

CEILING=()
gemm() {
  timeout --kill-after=5 "$T" "$PY" -m mugs.benchmarks.gemm_ceiling "${GEMM[@]}" --out "$RUN_DIR/env.jsonl" \
    >"$RUN_DIR/logs/gemm.log" 2>&1
  local rc=$?
  head -1 "$RUN_DIR/logs/gemm.log"
  status "gemm: exit $rc"
}
ceiling() {  # the measured GEMM ceiling of this run (or of the run folder's earlier part), as a step flag
  local c
  c=$("$PY" -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if 'gemm_ceiling' in l]; print(r[-1]['tflops_median'] if r else '')" \
      "$RUN_DIR/env.jsonl" 2>/dev/null)
  CEILING=(); [ -n "$c" ] && CEILING=(--ceiling_tflops "$c")
}

step() {  # step NAME ARGS...: the step benchmark, its records appended as each mode finishes
  local name=$1; shift
  ceiling
  echo "== $name (timeout ${T}s): python -m mugs.benchmarks.step $* ${STEPS[*]}"
  timeout --kill-after=10 "$T" "$PY" -m mugs.benchmarks.step "$@" "${STEPS[@]}" --phase_steps 1 "${CEILING[@]}" \
    --out "$RUN_DIR/step.jsonl" --tag "gpu_suite:$name" >"$RUN_DIR/logs/$name.log" 2>&1
  local rc=$?
  grep -E '^\[|speed-up|Error' "$RUN_DIR/logs/$name.log" | tail -8
  status "$name: exit $rc$([ $rc -eq 124 ] && echo ' (timed out: the modes it finished are recorded)')"
}
vit_large() { step "$1" "${L_ARGS[@]}"; }
vit_small() { step "$1" "${S_ARGS[@]}"; }
vit_base() { step "$1" "${B_ARGS[@]}"; }
vit_large_compile() { step "$1" "${LC_ARGS[@]}"; }

workers() {  # loader workers: WORKERS_MAX, fewer when /dev/shm is small (each worker's batches pass through it)
  local shm_mb
  shm_mb=$(df -Pm /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
  if [ -z "$shm_mb" ] || [ "$shm_mb" -lt 1024 ]; then echo 0
  elif [ "$shm_mb" -lt 8192 ]; then echo $(( WORKERS_MAX < 2 ? WORKERS_MAX : 2 ))
  else echo "$WORKERS_MAX"; fi
}

train_e2e() {
  local out=$TMP/train loader=torchvision data nw
  [ -n "$DALI" ] && loader=dali
  data=$("$PY" -c "from mugs.benchmarks.synth_images import synth_imagenet_like; print(synth_imagenet_like($IMAGES))")
  nw=$(workers)
  # one process (a one-process group), so that killing its process group kills the trainer itself
  local cmd=("$PY" "$ROOT/train_fsdp.py" --data_path "$data" --output_dir "$out" --loader "$loader" "${TRAIN[@]}"
    --epochs 4 --warmup_epochs 1 --max_steps 30 --ckpt_every_steps 10 --ckpt_every_minutes 0 --num_workers "$nw")
  echo "== train_e2e (timeout ${T}s, $nw loader workers for $(df -Ph /dev/shm | awk 'NR==2 {print $2}') /dev/shm): ${cmd[*]}"
  local t0; t0=$(date +%s)
  setsid "${cmd[@]}" >"$RUN_DIR/logs/train_first.log" 2>&1 &
  local pid=$! killed_at=""
  while kill -0 "$pid" 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt $(( T * 65 / 100 )) ]; do
    if [ -f "$out/checkpoints/step_00000010/COMPLETE" ]; then
      kill -9 -- "-$pid" 2>/dev/null; killed_at=after_step_10; break
    fi
    sleep 0.1
  done
  kill -9 -- "-$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  local first=$(( $(date +%s) - t0 )) rc=1 resumed=""
  if [ -n "$killed_at" ]; then
    timeout --kill-after=10 $(( T - first > 30 ? T - first : 30 )) "${cmd[@]}" >"$RUN_DIR/logs/train_resume.log" 2>&1
    rc=$?
    resumed=$(sed -n 's/.*resumed from .* at step \([0-9]*\).*/\1/p' "$RUN_DIR/logs/train_resume.log" | head -1)
  fi
  "$PY" -m mugs.benchmarks.gpu_summary train-record --output_dir "$out" --gpu "$GPU" \
    --killed "${killed_at:-no}" --resumed_at "${resumed:-0}" --exit_code "$rc" --first_s "$first" \
    --total_s $(( $(date +%s) - t0 )) --out "$RUN_DIR/train_e2e.jsonl" >/dev/null
  tail -3 "$RUN_DIR/logs/train_resume.log" 2>/dev/null || tail -20 "$RUN_DIR/logs/train_first.log"
  status "train_e2e: killed ${killed_at:-never (see logs/train_first.log)}, resumed at ${resumed:-no}, exit $rc"
}

dali_loader() {  # issue 27: the new loader and the old one (benchmarks/legacy_dali) in the same call, a decode-only
  # ceiling, and ViT-S at the Table-1 batch fed by the loader vs by synthetic batches (the step benchmark)
  if [ -z "$DALI" ]; then status "dali_loader: skipped (DALI not importable)"; return 0; fi
  local b rc backend each=$(( T / (2 * $(echo $LOADER_BATCHES | wc -w) + 4) ))
  for b in $LOADER_BATCHES; do
    for backend in dali dali_v1; do
      timeout --kill-after=5 "$each" "$PY" -m mugs.benchmarks.loader --backend "$backend" --batch-size "$b" "${LOADER[@]}" \
        --out "$RUN_DIR/loader.jsonl" >"$RUN_DIR/logs/loader_${backend}_b$b.log" 2>&1
      rc=$?
      tail -1 "$RUN_DIR/logs/loader_${backend}_b$b.log"
      status "dali_loader $backend batch $b: exit $rc"
    done
  done
  timeout --kill-after=5 "$each" "$PY" -m mugs.benchmarks.loader --decode-only --batch-size "$FED_BATCH" "${LOADER[@]}" \
    --out "$RUN_DIR/loader.jsonl" >"$RUN_DIR/logs/loader_decode_only.log" 2>&1
  rc=$?; tail -1 "$RUN_DIR/logs/loader_decode_only.log"; status "dali_loader decode-only: exit $rc"
  # ViT-S fed by the loader (a short training run) vs the same step on synthetic batches
  local out=$TMP/fed data
  data=$("$PY" -c "from mugs.benchmarks.synth_images import synth_imagenet_like; print(synth_imagenet_like($IMAGES))")
  timeout --kill-after=5 $(( each * 2 )) "$PY" "$ROOT/train_fsdp.py" --data_path "$data" --output_dir "$out" --loader dali \
    "${FED[@]}" --ckpt_every_minutes 0 >"$RUN_DIR/logs/loader_fed_train.log" 2>&1
  rc=$?
  timeout --kill-after=5 "$each" "$PY" -m mugs.benchmarks.step "${FED_STEP[@]}" "${STEPS[@]}" --out "$RUN_DIR/step.jsonl" \
    --tag "gpu_suite:dali_loader_synthetic" >"$RUN_DIR/logs/loader_fed_synthetic.log" 2>&1
  local rc2=$?
  "$PY" -m mugs.benchmarks.gpu_summary fed-record --output_dir "$out" --gpu "$GPU" --exit_code "$rc" \
    --step_records "$RUN_DIR/step.jsonl" --out "$RUN_DIR/loader.jsonl" >/dev/null
  status "dali_loader fed ViT-S: train exit $rc, synthetic step exit $rc2"
}

profile() {  # profile NAME: each mode/batch its own process and timeout, its record appended as it finishes
  local b rc t0=$(date +%s) runs=()
  for b in $P_BATCHES; do runs+=("default $b"); done
  for b in $P_GRAPHED; do runs+=("graphed $b"); done
  for b in $P_BATCHES; do runs+=("best $b"); done
  for b in $P_SWEEP; do runs+=("default $b"); done
  runs+=("host_floor -")
  local r label batch extra lim
  for r in "${runs[@]}"; do
    read -r label batch <<<"$r"
    lim=$(( T - ($(date +%s) - t0) ))
    if [ "$lim" -lt 30 ]; then status "profile $label $batch: skipped (${lim}s left)"; continue; fi
    [ "$lim" -gt 200 ] && lim=200
    case $label in
      default) extra=("${P_ARGS[@]}" --batch_size_per_gpu "$batch") ;;
      best) extra=("${P_ARGS[@]}" --batch_size_per_gpu "$batch" "${P_BEST[@]}") ;;
      graphed) extra=("${P_ARGS[@]}" --batch_size_per_gpu "$batch" --cuda_graphs true) ;;
      host_floor) extra=("${P_FLOOR[@]}") ;;
    esac
    timeout --kill-after=10 "$lim" "$PY" -m mugs.benchmarks.profile_step "${extra[@]}" "${P_STEPS[@]}" --label "$label" \
      --out "$RUN_DIR/profile.jsonl" --tag "gpu_suite:profile" >"$RUN_DIR/logs/profile_${label}_$batch.log" 2>&1
    rc=$?
    grep -E '^\[|Error' "$RUN_DIR/logs/profile_${label}_$batch.log" | tail -3
    status "profile $label $batch: exit $rc"
  done
}

part preflight 45 20 preflight
part gemm 30 10 gemm
part vit_large 170 60 vit_large
part train_e2e 200 90 train_e2e
part vit_small 60 30 vit_small
part vit_base 60 30 vit_base
part vit_large_compile 150 90 vit_large_compile
part dali_loader 300 60 dali_loader
[ "$ONLY" = profile ] && part profile 550 60 profile  # its own call: a full run's budget has no room for it
echo "== suite done in $(( $(date +%s) - START ))s"
cat "$RUN_DIR/summary.md"
exit 0
