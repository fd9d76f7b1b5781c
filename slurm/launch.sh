# shellcheck shell=bash
# Shared body of the slurm/vit_*.sh templates; they set RUN and `source` this file (sourcing keeps
# the USR1 trap they installed first thing: a shell without one dies of the signal).
#
# What it does: Table-1 flags from mugs.configs.table1 -> the start-up checks (flags, data path,
# output dir, a resume with other settings: one line, exit 2, before anything is allocated) ->
# one `srun` task per node running mugs-train (python -m mugs.training.launch: torchrun in-process,
# c10d rendezvous on the first node) -> python -m mugs.training.trainer on every GPU.
# Signals: SIGUSR1 to this batch shell (the time-limit warning, #SBATCH --signal=B:USR1@300, or
# `scancel --signal=USR1 --batch JOB`) touches OUTPUT_DIR/STOP, which every rank checks after each
# step: the trainer checkpoints and exits 0, then this shell runs `scontrol requeue`; the requeued
# job resumes from OUTPUT_DIR. SIGTERM here (scancel, preemption) saves the same way, never requeues.
# `scancel --signal=USR1 JOB` (the steps) reaches mugs-train, which passes it to its workers: they
# save and exit 0 with the exit reason `sigusr1`, which this shell requeues like its own USR1.
#
# Environment (all optional; sbatch passes the submitting shell's environment into the job):
#   DATA_PATH           ImageNet train folder or mugs-scan-data list (default /datasets/imagenet/train)
#   OUTPUT_DIR          checkpoints + logs; the same dir resumes (default $SLURM_SUBMIT_DIR/runs/$RUN)
#   GPUS_PER_NODE       processes per node (default: GPUs Slurm gave the job per node, else 8)
#   GLOBAL_BATCH        keep this global batch (default: the paper's); per-GPU batch = GLOBAL_BATCH / GPUs
#                       (fewer GPUs at a larger per-GPU batch keep the method's statistics: README, SLURM section)
#   BATCH_SIZE_PER_GPU  fix the per-GPU batch instead (the global batch, and with it the lr, change)
#   EXTRA_ARGS          train_fsdp.py flags appended last, so they override (split on whitespace);
#                       arguments after the script name (`sbatch slurm/x.sh --epochs 10`) go after them
#   PYTHON              interpreter with mugs installed (default: python)
#   KNN_VAL_PATH        labelled ImageNet val ImageFolder (val/<wnid>/*.JPEG) or file list: turns on the online
#                       k-NN monitor (the teacher's 20-NN top-1/top-5 before step 1 and every KNN_EVERY_EPOCHS)
#   KNN_TRAIN_PATH      the monitor's bank (default: DATA_PATH)
#   KNN_EVERY_EPOCHS    default 1; KNN_SUBSET_PER_CLASS default 10: 10 images per class of train as the bank
#                       and 10 per class of val as queries (10k + 10k; about 0.5% of a ViT-L epoch, README)
#   MASTER_ADDR/PORT    rendezvous host/port (default: first node of the job, 20000 + job id % 20000)
#   MUGS_DRY_RUN=1      print the command instead of running it (tests; checking a change)
# Node count: sbatch --nodes=N. Partition, account, time: -p/-A/--time or SBATCH_PARTITION/_ACCOUNT/_TIMELIMIT.

set -uo pipefail  # no -e: `wait` returns >128 whenever a trapped signal interrupts it
log() { echo "mugs-slurm: $*"; }

: "${RUN:?set RUN (a key of mugs.configs.table1.RUNS) before sourcing slurm/launch.sh}"
MUGS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
DATA_PATH=${DATA_PATH:-/datasets/imagenet/train}
OUTPUT_DIR=${OUTPUT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/runs/$RUN}
NNODES=${SLURM_JOB_NUM_NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}  # every Table-1 run uses 8-GPU nodes
MUGS_SIGNAL=${MUGS_SIGNAL:-}  # set by the template's early trap if USR1 came before this line
MUGS_CANCELLED=
SRUN_PID=

# NCCL on InfiniBand clusters. Each is only a default: export your own before sbatch to override.
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}  # inter-node traffic over IB verbs (RDMA), not TCP sockets
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}         # INFO logs the transport per peer: look for "NET/IB"
# a lost peer aborts the collective (the job fails and can be resubmitted) instead of hanging to the time limit
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Site-specific, left to NCCL's detection unless you set them: NCCL_IB_HCA (which HCAs, e.g. =mlx5_0,mlx5_1
# to skip storage NICs), NCCL_SOCKET_IFNAME (bootstrap interface, e.g. ib0 or ^docker,lo), NCCL_IB_GID_INDEX
# (3 on RoCE v2), NCCL_NET_GDR_LEVEL (GPUDirect RDMA reach), GLOO_SOCKET_IFNAME for --device cpu.
export PYTHONUNBUFFERED=1  # trainer output reaches the job log as it happens

on_signal() {  # $1: USR1 (save + requeue) or TERM (scancel / preemption: save, never requeue)
    [ -n "$MUGS_SIGNAL" ] || MUGS_SIGNAL=$1
    [ "$1" = TERM ] && MUGS_CANCELLED=1
    log "got SIG$1 (restart ${SLURM_RESTART_COUNT:-0}): asking the trainer to checkpoint and exit"
    [ -n "$SRUN_PID" ] && touch "$OUTPUT_DIR/STOP"  # every rank checks it after each step
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

requeue() {
    trap '' TERM USR1  # requeue terminates this shell; the handler must not leave a STOP behind
    log "requeueing job $SLURM_JOB_ID; the next run resumes from $OUTPUT_DIR"
    scontrol requeue "$SLURM_JOB_ID" || { log "error: scontrol requeue failed"; exit 1; }
    exit 0
}

wants_requeue() {  # $1: the trainer's exit reason, a training/exit_reason.py StopReason value (every one is
    # named here: tests/test_exit_reason.py), or '' when it left no exit record (a crash, a killed worker)
    case $1 in
        finished|max_steps)  # the run is complete
            [ "$MUGS_SIGNAL" = USR1 ] && log "training is complete: not requeueing"
            return 1 ;;
        sigusr1) return 0 ;;  # `scancel --signal=USR1 JOB` reached mugs-train and its workers
        stop_file|sigterm|sigint|launcher_exit|other_rank|'') [ "$MUGS_SIGNAL" = USR1 ] ;;  # after this shell's USR1
        *) log "warning: unknown trainer exit reason '$1'"; [ "$MUGS_SIGNAL" = USR1 ] ;;
    esac
}

BATCH_OPTS=()
[ -n "${BATCH_SIZE_PER_GPU:-}" ] && BATCH_OPTS+=(--batch-size-per-gpu "$BATCH_SIZE_PER_GPU")
[ -n "${GLOBAL_BATCH:-}" ] && BATCH_OPTS+=(--global-batch "$GLOBAL_BATCH")
FLAGS_TXT=$("$PYTHON" -m mugs.configs.table1 "$RUN" --world-size $((NNODES * GPUS_PER_NODE)) \
    "${BATCH_OPTS[@]}") || exit 2
mapfile -t FLAGS <<< "$FLAGS_TXT"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
# not hyper-parameters: shard within a node and replicate across nodes (a no-op on one node)
SYSTEM_FLAGS=(--hsdp true)
# the online k-NN monitor (reads the teacher only: the run is bitwise the same with it on or off)
KNN_FLAGS=()
if [ -n "${KNN_VAL_PATH:-}" ]; then
    KNN_FLAGS=(--knn_every_epochs "${KNN_EVERY_EPOCHS:-1}" --knn_train_path "${KNN_TRAIN_PATH:-$DATA_PATH}"
               --knn_val_path "$KNN_VAL_PATH" --knn_subset_per_class "${KNN_SUBSET_PER_CLASS:-10}")
fi

MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}

TRAIN_ARGS=(--data_path "$DATA_PATH" --output_dir "$OUTPUT_DIR" "${FLAGS[@]}" "${SYSTEM_FLAGS[@]}" "${KNN_FLAGS[@]}" "${EXTRA[@]}" "$@")
# mugs-train handles USR1/TERM/INT itself (passes them to its workers); USR1 is ignored only until
# it has installed its handler, so a signal during its start-up does not kill it
CMD=(srun --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"
     --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec "$@"' mugs-task
     "$PYTHON" -m mugs.training.launch --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE"
     --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${SLURM_JOB_ID:-mugs}"
     -- "${TRAIN_ARGS[@]}")

if [ -n "${MUGS_DRY_RUN:-}" ]; then
    printf '%q ' "${CMD[@]}"; echo
    exit 0
fi
# every start-up check in this one process, before srun: a bad flag or path is the job log's last line
"$PYTHON" -m mugs.training.launch --check_only --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    -- "${TRAIN_ARGS[@]}" || exit 2
log "job ${SLURM_JOB_ID:-?} ($RUN) restart ${SLURM_RESTART_COUNT:-0}: $NNODES nodes x $GPUS_PER_NODE processes," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR"
log "NCCL: $(env | grep -E '^(TORCH_)?NCCL_' | sort | tr '\n' ' ')"
log "command: $(printf '%q ' "${CMD[@]}")"
[ -n "$MUGS_CANCELLED" ] && exit 143  # cancelled during set-up: nothing to save
[ "$MUGS_SIGNAL" = USR1 ] && requeue  # preempted during set-up (or --time below the signal grace: fix that)
# a STOP we left on the way out of a previous run would stop this one at its first step
[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && rm -f "$OUTPUT_DIR/STOP"
LOG_LINES=$(cat "$OUTPUT_DIR/log.txt" 2>/dev/null | wc -l)

"${CMD[@]}" &
SRUN_PID=$!
[ -n "$MUGS_SIGNAL" ] && touch "$OUTPUT_DIR/STOP"  # a signal that came while srun was being started
while :; do  # traps run only while the shell waits; wait returns early after each one
    wait "$SRUN_PID"
    rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
SRUN_PID=

# What the trainer said this run ended with: the "reason" of its last exit record in log.txt (a StopReason value)
reason=$(tail -n +"$((LOG_LINES + 1))" "$OUTPUT_DIR/log.txt" 2>/dev/null | grep '"event": "exit"' | tail -n 1 |
         sed -n 's/.*"reason": "\([^"]*\)".*/\1/p')
log "training exited with code $rc; trainer: ${reason:-no exit record}"
[ -n "$MUGS_SIGNAL" ] && rm -f "$OUTPUT_DIR/STOP"
[ -z "$MUGS_CANCELLED" ] && wants_requeue "$reason" && requeue
exit "$rc"
