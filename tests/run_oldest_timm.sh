#!/usr/bin/env bash
# The model/step unit tests against the OLDEST timm that setup.py supports ("timm>=X" there).
# timm is pure Python: it is installed with --no-deps into its own folder and put first on
# PYTHONPATH, so the environment's own timm (the constraints file's) stays as it is.
# Usage: bash tests/run_oldest_timm.sh [extra pytest args]   ($PYTHON picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
want=$(sed -n 's/.*"timm>=\([0-9.]*\)".*/\1/p' setup.py)
[ -n "$want" ] || { echo "run_oldest_timm.sh: no \"timm>=X\" in setup.py" >&2; exit 2; }
dir=${TIMM_OLDEST_DIR:-${TMPDIR:-/tmp}/mugs-timm-$want}
version() { PYTHONPATH="$dir" "$PY" -c 'import timm; print(timm.__version__)' 2>/dev/null || true; }
if [ "$(version)" != "$want" ]; then
  rm -rf "$dir"
  "$PY" -m pip install -q --no-deps --target "$dir" "timm==$want"
fi
got=$(version)
[ "$got" = "$want" ] || { echo "run_oldest_timm.sh: wanted timm $want from $dir, Python imports $got" >&2; exit 1; }
echo "run_oldest_timm.sh: timm $got from $dir"
PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_model_units.py tests/test_parity.py tests/test_fused_pass.py tests/test_compile_graphs.py \
  tests/test_pipeline_randaug.py "tests/test_eval.py::test_export_timm_named_model_from_released_backbone_file" \
  "$@"
