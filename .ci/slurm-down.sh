#!/usr/bin/env bash
# Stops the cluster .ci/slurm-up.sh started (cancels its jobs, then ends its three daemons by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${MUGS_SLURM_DIR:-/tmp/mugs-slurm}
[ -f "$DIR/slurm.conf" ] || exit 0
python tests/slurm_cluster.py down "$DIR"
