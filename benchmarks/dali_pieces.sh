#!/usr/bin/env bash
# DALI for a GPU machine with no package index, carried in pieces small enough for one copy each.
#   bash benchmarks/dali_pieces.sh prepare [PY_VERSION] [PIECE_MB]   # here, with the index: .whl/ pieces + sha256
#   bash benchmarks/dali_pieces.sh receive                           # there, once per carried piece
#   DALI_WHEELS=/tmp/dali bash benchmarks/gpu_suite.sh               # there, after the last piece
# `prepare` downloads nvidia-dali-cuda130 (the version this checkout's environment has, else 2.4.0) and
# the wheels it needs that a torch machine lacks (nvImageCodec, nvCOMP, libcst, optree, nvtx, gast,
# astunparse, makefun, six, packaging) for PY_VERSION (default 3.12), tars them and splits the tar into
# PIECE_MB pieces (default 58: one piece plus this repository's ~27 MB of tracked files would not fit
# a 64 MiB copy, so move the parity traces and the Fashion-MNIST subset aside for the carrying calls,
# which need no code). `receive` moves the pieces that arrived into /tmp/dali, where the suite's
# DALI_WHEELS reads them (it checks nothing itself: run `sha256sum -c dali_wheels.sha256` there).
# Used for benchmarks/results/gpu/NVIDIA_H200-20261204 (5 pieces over 5 consecutive calls of a warm machine).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in
  prepare)
    py=${2:-3.12} mb=${3:-58}
    ver=$(python3 -m pip show nvidia-dali-cuda130 2>/dev/null | sed -n 's/^Version: //p')
    plat=(); for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do plat+=(--platform "$p"); done
    dir=$ROOT/.whl && rm -rf "$dir" && mkdir -p "$dir/dali_wheels"
    for spec in "nvidia-dali-cuda130==${ver:-2.4.0}" "nvidia-nvimgcodec-cu13>=0.9,<0.10" "nvidia-libnvcomp-cu13==5.3.0.16" \
                "libcst~=1.8" optree nvtx "gast<=0.7.0" "astunparse<=1.6.3" makefun "six<=1.17" "packaging<=26.3"; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${plat[@]}" \
        -d "$dir/dali_wheels" "$spec"
    done
    (cd "$dir" && tar -cf - dali_wheels | split -b "${mb}M" -a 1 - dali_wheels.tar.part- && rm -rf dali_wheels \
      && sha256sum dali_wheels.tar.part-* >dali_wheels.sha256)
    ls -l "$dir"
    echo "carry one .whl/dali_wheels.tar.part-X per device call (the last one with .whl/dali_wheels.sha256), each running:"
    echo "  bash benchmarks/dali_pieces.sh receive"
    ;;
  receive)
    mkdir -p /tmp/dali
    mv "$ROOT"/.whl/dali_wheels.* /tmp/dali/ 2>/dev/null || true
    ls -l /tmp/dali
    ;;
  *) echo "usage: bash benchmarks/dali_pieces.sh prepare [PY_VERSION] [PIECE_MB] | receive" >&2; exit 2 ;;
esac
