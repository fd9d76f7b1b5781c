#!/usr/bin/env bash
# One-call GPU acceptance and measurement pass for ONE GPU (<= ~8 minutes, every part under its own timeout).
#   bash benchmarks/gpu_suite.sh              # from anywhere; needs torch, timm, tensorboard; DALI optional
# Parts, in priority order (a part is skipped when the budget SUITE_BUDGET_S, default 470 s, runs short):
#   a. train_fsdp.py end to end: ~30 steps of ViT-S/16 on JPEGs made here, bf16 + torch.compile + fused AdamW,
#      DALI "mixed" (GPU) decode when nvidia.dali imports, else the torchvision loader; SIGKILLed after the
#      step-10 checkpoint and resumed to step 30.
#   c. the Mugs step (benchmarks/step.py): ViT-L/16 at 16 per GPU, optimised vs paper-style in one process
#      (images/s, MFU, peak memory, speed-up); d. host syncs per step (torch.cuda.set_sync_debug_mode) and
#      the measured collectives come in the same records.
#   b. the DALI GPU loader's images/s (2 global + 10 local crops) at batch 64 and 128.
#   c'. ViT-S/16 at 64 and ViT-B/16 at 42 per GPU (Table 1).
# Results: JSON lines (with the GPU's name) appended to benchmarks/results/{step,loader,train_e2e}.jsonl,
# logs and summary.md in benchmarks/results/gpu_suite/<time>-<gpu>/ (and copied under $OUT when set).
# `mugs` need not be installed: this checkout is installed into a temp dir (pip --target, no index), or
# mapped there by symlinks when pip cannot build it. DALI from copied wheels: DALI_WHEELS=DIR (see
# benchmarks/README.md, "DALI without a package index").
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-470}
PY=${PYTHON:-python}
err() { echo "gpu_suite: error: $*" >&2; exit 2; }

# ---------------------------------------------------------------- 0. a GPU, or stop at once
command -v "$PY" >/dev/null || err "no '$PY' on PATH (set PYTHON=/path/to/python)"
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null) \
  || err "'$PY -c \"import torch\"' failed: install torch first"
[ -n "$GPU" ] || err "no CUDA GPU visible (torch.cuda.is_available() is False): nothing measured; run this on a GPU machine"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/mugs_gpu_suite.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
SLUG=$(echo "$GPU" | tr -cs 'A-Za-z0-9' '_' | sed 's/_$//')
RUN_DIR=$ROOT/benchmarks/results/gpu_suite/$(date -u +%Y%m%d-%H%M%S)-$SLUG
mkdir -p "$RUN_DIR"
LOG=$RUN_DIR/suite.log
exec > >(tee -a "$LOG") 2>&1
echo "gpu_suite: $GPU; logs in $RUN_DIR"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# ---------------------------------------------------------------- 1. this checkout as `mugs`, DALI if given
SITE=$TMP/site
mkdir -p "$SITE" "$TMP/src"
cp -r "$ROOT/setup.py" "$ROOT"/{model,pipeline,training,configs,eval,core,benchmarks} "$TMP/src/" 2>/dev/null
rm -rf "$TMP/src/benchmarks/results"
if "$PY" -m pip install -q --no-deps --no-index --no-build-isolation --target "$SITE" "$TMP/src" >"$RUN_DIR/install.log" 2>&1; then
  HOW="pip install --target (this checkout)"
else  # no pip/setuptools able to build offline: map the package folders by symlinks, as setup.py names them
  rm -rf "$SITE" && mkdir -p "$SITE/mugs" && touch "$SITE/mugs/__init__.py"
  for d in model pipeline training configs eval core benchmarks; do ln -s "$ROOT/$d" "$SITE/mugs/$d"; done
  HOW="symlinks to this checkout (pip could not build: see install.log)"
fi
PATHS=$SITE
if [ -n "${DALI_WHEELS:-}" ] && ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
  # a directory of wheels (DALI + the dependencies this machine lacks), or the pieces of a split tarball of one
  WHEELS=$DALI_WHEELS
  if ls "$DALI_WHEELS"/*.part-* >/dev/null 2>&1; then
    mkdir -p "$TMP/wheels" && cat "$DALI_WHEELS"/*.part-* | tar -x -C "$TMP/wheels" \
      && WHEELS=$(dirname "$(find "$TMP/wheels" -name 'nvidia_dali*.whl' | head -1)")
  fi
  if "$PY" -m pip install -q --no-index --no-deps --target "$TMP/dali" "$WHEELS"/*.whl >>"$RUN_DIR/install.log" 2>&1; then
    PATHS=$PATHS:$TMP/dali
  else
    echo "gpu_suite: DALI wheels in $WHEELS did not install (see install.log); going on without DALI"
  fi
fi
export PYTHONPATH="$PATHS${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import mugs.training.step, mugs.benchmarks.step" || err "cannot import mugs from $SITE (see $RUN_DIR/install.log)"
DALI=$("$PY" -c "import nvidia.dali; print(nvidia.dali.__version__)" 2>/dev/null)
echo "mugs: $HOW; DALI: ${DALI:-not importable (torchvision loader; part b skipped)}"
{ nvidia-smi -L 2>/dev/null; "$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"; } \
  | tee "$RUN_DIR/env.txt"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
STATUS=()
# budget NAME LIMIT MIN: sets T to the timeout to use (LIMIT, or what is left); fails when fewer than MIN s remain
budget() {
  local rem; rem=$(left)
  echo "[t=$(( $(date +%s) - START ))s]"
  if [ "$rem" -lt "$3" ]; then STATUS+=("$1: skipped (${rem}s of the budget left)"); echo "== $1: skipped"; return 1; fi
  T=$(( $2 < rem - 5 ? $2 : rem - 5 ))
}
OUTS=(--out "$ROOT/benchmarks/results/step.jsonl" --out "$RUN_DIR/step.jsonl")
step() {  # step NAME LIMIT MIN ARGS...
  local name=$1 t; budget "$@" || return 0; t=$T; shift 3
  echo "== $name (timeout ${t}s): python -m mugs.benchmarks.step $*"
  timeout --kill-after=10 "$t" "$PY" -m mugs.benchmarks.step "$@" "${OUTS[@]}" --tag "gpu_suite:$name" \
    >"$RUN_DIR/$name.log" 2>&1
  local rc=$?
  grep -E '^\[|speed-up|Error' "$RUN_DIR/$name.log" | grep -v '^{' | tail -6
  STATUS+=("$name: exit $rc")
}

# ---------------------------------------------------------------- a. train end to end, kill, resume
DATA=$("$PY" -c "from mugs.benchmarks.loader import synth_imagenet_like; print(synth_imagenet_like(320))")
train_e2e() {
  local t; budget train_e2e 270 150 || return 0; t=$T
  local out=$TMP/train loader=torchvision
  [ -n "$DALI" ] && loader=dali
  # one GPU: plain python (a one-process group), so that killing its process group kills the trainer itself
  local cmd=("$PY" "$ROOT/train_fsdp.py"
    --data_path "$DATA" --output_dir "$out" --device cuda --precision bf16 --compile true --loader "$loader"
    --arch vit_small --batch_size_per_gpu 32 --epochs 4 --warmup_epochs 1 --max_steps 30
    --ckpt_every_steps 10 --ckpt_every_minutes 0 --num_workers 8)
  echo "== train_e2e (timeout ${t}s): ${cmd[*]}"
  local t0; t0=$(date +%s)
  setsid "${cmd[@]}" >"$RUN_DIR/train_first.log" 2>&1 &
  local pid=$! killed_at=""
  while kill -0 "$pid" 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt $(( t * 65 / 100 )) ]; do
    if [ -f "$out/checkpoints/step_00000010/COMPLETE" ]; then
      kill -9 -- "-$pid" 2>/dev/null; killed_at=after_step_10; break
    fi
    sleep 0.1
  done
  kill -9 -- "-$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  local first=$(( $(date +%s) - t0 )) rc=1 resumed=""
  if [ -n "$killed_at" ]; then
    timeout --kill-after=10 $(( t - first > 30 ? t - first : 30 )) "${cmd[@]}" >"$RUN_DIR/train_resume.log" 2>&1
    rc=$?
    resumed=$(sed -n 's/.*resumed from .* at step \([0-9]*\).*/\1/p' "$RUN_DIR/train_resume.log" | head -1)
  fi
  "$PY" -m mugs.benchmarks.gpu_summary train-record --output_dir "$out" --gpu "$GPU" --loader "$loader" \
    --killed "${killed_at:-no}" --resumed_at "${resumed:-0}" --exit_code "$rc" --first_s "$first" \
    --total_s $(( $(date +%s) - t0 )) --out "$ROOT/benchmarks/results/train_e2e.jsonl" --out "$RUN_DIR/train_e2e.jsonl"
  tail -3 "$RUN_DIR/train_resume.log" 2>/dev/null || tail -20 "$RUN_DIR/train_first.log"
  STATUS+=("train_e2e: killed at ${killed_at:-never (see train_first.log)}, resumed at ${resumed:-no}, exit $rc")
}
train_e2e

# ---------------------------------------------------------------- c + d. the ViT-L step (with syncs and collectives)
step vit_large_b16_compare 150 60 --arch vit_large --batch_size_per_gpu 16 --drop_path_rate 0.3 --compare \
  --steps 6 --warmup 3 --phase_steps 1

# ---------------------------------------------------------------- b. the DALI GPU loader
loader() {  # loader BATCH
  local name=loader_dali_b$1 t; budget "loader_dali_b$1" 60 30 || return 0; t=$T
  if [ -z "$DALI" ]; then STATUS+=("$name: skipped (DALI not importable)"); return 0; fi
  echo "== $name (timeout ${t}s)"
  timeout --kill-after=10 "$t" "$PY" -m mugs.benchmarks.loader --backend dali --device gpu --batch-size "$1" \
    --batches 8 --warmup 2 --images 320 --out "$ROOT/benchmarks/results/loader.jsonl" >"$RUN_DIR/$name.log" 2>&1
  local rc=$?
  tail -1 "$RUN_DIR/$name.log"
  [ $rc -eq 0 ] && tail -1 "$ROOT/benchmarks/results/loader.jsonl" >>"$RUN_DIR/loader.jsonl"
  STATUS+=("$name: exit $rc")
}
loader 64
loader 128

# ---------------------------------------------------------------- c'. ViT-S and ViT-B at their Table-1 batches
step vit_small_b64 75 45 --arch vit_small --batch_size_per_gpu 64 --steps 6 --warmup 3 --phase_steps 0
step vit_base_b42 75 45 --arch vit_base --batch_size_per_gpu 42 --steps 6 --warmup 3 --phase_steps 0

# ---------------------------------------------------------------- summary
"$PY" -m mugs.benchmarks.gpu_summary table --run_dir "$RUN_DIR" | tee "$RUN_DIR/summary.md"
echo "== suite done in $(( $(date +%s) - START ))s"
printf '  %s\n' "${STATUS[@]}" | tee -a "$RUN_DIR/summary.md"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp -r "$RUN_DIR" "$OUT/"; fi
exit 0
