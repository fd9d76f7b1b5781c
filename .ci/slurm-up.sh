#!/usr/bin/env bash
# Installs Debian's SLURM + munge (if missing) and starts a single-host cluster in MUGS_SLURM_DIR
# (default /tmp/mugs-slurm) for the SLURM tests and for trying the templates by hand:
#   .ci/slurm-up.sh && export MUGS_SLURM_DIR=/tmp/mugs-slurm SLURM_CONF=/tmp/mugs-slurm/slurm.conf
# The tests reuse this cluster when MUGS_SLURM_DIR is exported, else start their own.
# Only the four packages: the slurm-wlm metapackage pulls in 43. Apt does not start system
# services here (policy-rc.d); our daemons run from files in one folder (tests/slurm_cluster.py).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${MUGS_SLURM_DIR:-/tmp/mugs-slurm}
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
   ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
[ "${1:-}" = --install-only ] && exit 0
python tests/slurm_cluster.py up "$DIR"
