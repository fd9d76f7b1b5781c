#!/usr/bin/env bash
# One prepared GPU measurement pass for a single H100 (torch + timm installed; no DALI, no network):
# ViT-L Mugs step in bf16 at the paper's batch 16 with MFU and the paper-style baseline in the
# same process (speed-up), then ViT-S/B, compile, TF32-baseline and activation-checkpointing
# variants while the time budget (SUITE_BUDGET_S, default 450 s) lasts. Every run has its own
# timeout and a failure never stops the suite. Results: JSON lines appended to
# benchmarks/results/step.jsonl and, when $OUT is set, to $OUT/step.jsonl; logs next to them.
#   bash benchmarks/h100_suite.sh            # from the repository root
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-450}
RESULTS=$ROOT/benchmarks/results
LOGS=${OUT:+$OUT/logs}
LOGS=${LOGS:-$RESULTS/logs}
mkdir -p "$RESULTS" "$LOGS"
OUTS=(--out "$RESULTS/step.jsonl")
[ -n "${OUT:-}" ] && OUTS+=(--out "$OUT/step.jsonl")
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONUNBUFFERED=1

# `mugs` not installed here? Map the top-level folders under a mugs/ namespace via symlinks (no pip, no network).
if [ -n "${SUITE_FORCE_SHIM:-}" ] || ! python -c "import mugs.training.step" 2>/dev/null; then
  SHIM=$(mktemp -d)/shim && mkdir -p "$SHIM/mugs" && touch "$SHIM/mugs/__init__.py"
  for d in model training configs pipeline eval; do ln -s "$ROOT/$d" "$SHIM/mugs/$d"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  python -c "import mugs.training.step; print('suite: mugs from', mugs.__path__)" || { echo "suite: cannot import mugs (torch/timm missing?)"; exit 1; }
fi

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
STATUS=()
# run NAME LIMIT_S MIN_S ARGS...: skip when fewer than MIN_S seconds remain, else run under min(LIMIT_S, left-10)
run() {
  local name=$1 limit=$2 min=$3; shift 3
  local rem; rem=$(left)
  if [ "$rem" -lt "$min" ]; then STATUS+=("$name: skipped (${rem}s left)"); echo "== $name: skipped"; return 0; fi
  local t=$(( limit < rem - 10 ? limit : rem - 10 ))
  echo "== $name (timeout ${t}s): python benchmarks/step.py $*"
  timeout --kill-after=10 "$t" python benchmarks/step.py "$@" "${OUTS[@]}" --tag "h100_suite:$name" \
    > "$LOGS/$name.log" 2>&1
  local rc=$?
  grep -E '^\[|speed-up|Error|error' "$LOGS/$name.log" | grep -v '^{' | tail -8
  STATUS+=("$name: exit $rc")
  return $rc
}

{ nvidia-smi -L; python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"; } \
  2>&1 | tee "$LOGS/env.log"

# 1. the headline: ViT-L, bf16, batch 16, optimised vs paper-style baseline in one process
run vit_large_b16_compare 240 60 --arch vit_large --batch_size_per_gpu 16 --drop_path_rate 0.3 --compare --steps 8 --warmup 3 --phase_steps 2
if grep -q "OutOfMemoryError" "$LOGS/vit_large_b16_compare.log" 2>/dev/null; then
  run vit_large_b16_ac 150 60 --arch vit_large --batch_size_per_gpu 16 --drop_path_rate 0.3 --activation_checkpointing --steps 8 --warmup 3
fi
# 2. ViT-S and ViT-B at their Table-1 per-GPU batches, with their baselines
run vit_small_b64_compare 120 60 --arch vit_small --batch_size_per_gpu 64 --compare --steps 8 --warmup 3
run vit_base_b42_compare 120 60 --arch vit_base --batch_size_per_gpu 42 --compare --steps 8 --warmup 3
# 3. variants, if time allows: compiled blocks; the baseline with TF32 (torch<1.12's default); recompute
run vit_large_b16_compile 180 120 --arch vit_large --batch_size_per_gpu 16 --drop_path_rate 0.3 --compile --steps 8 --warmup 4
run vit_large_b16_baseline_tf32 90 60 --arch vit_large --batch_size_per_gpu 16 --drop_path_rate 0.3 --baseline --baseline_tf32 --steps 5 --warmup 2 --phase_steps 1
[[ "${STATUS[*]}" == *"vit_large_b16_ac:"* ]] || \
  run vit_large_b16_ac 90 60 --arch vit_large --batch_size_per_gpu 16 --drop_path_rate 0.3 --activation_checkpointing --steps 8 --warmup 3

# 4. projection from what was just measured (cheap)
if [ "$(left)" -gt 15 ]; then
  timeout 30 python benchmarks/scaling.py --results "$RESULTS/step.jsonl" > "$LOGS/scaling.md" 2>&1 && cat "$LOGS/scaling.md"
fi
echo "== suite done in $(( $(date +%s) - START ))s"
printf '  %s\n' "${STATUS[@]}"
exit 0
