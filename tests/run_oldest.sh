#!/usr/bin/env bash
# Tests once more on the OLDEST versions setup.py supports ("pkg>=X" there), one set at a time:
#   bash tests/run_oldest.sh timm                the model and step tests on the oldest timm
#   bash tests/run_oldest.sh torch torchvision   the unit tier on the oldest torch (the GPU machine's)
# The named packages are installed with --no-deps into their own folder, put first on PYTHONPATH, so
# the environment's own versions (the constraints file's) stay as they are; the rest of the
# environment (torch's CUDA libraries included) is shared. Arguments after `--` go to pytest.
# $PYTHON picks the interpreter; $OLDEST_DIR the folder (default: one per version set under $TMPDIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
pkgs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do pkgs+=("$1"); shift; done
[ $# -gt 0 ] && shift
case "${pkgs[*]}" in
  timm) tests=(tests/test_model_units.py tests/test_parity.py tests/test_fused_pass.py tests/test_compile_graphs.py
               tests/test_pipeline_randaug.py "tests/test_eval.py::test_export_timm_named_model_from_released_backbone_file") ;;
  "torch torchvision") tests=(-m unit tests) ;;
  *) echo "usage: bash tests/run_oldest.sh timm | torch torchvision [-- pytest args]" >&2; exit 2 ;;
esac
specs=()
for p in "${pkgs[@]}"; do
  v=$(sed -n "s/.*\"$p>=\([0-9.]*\)\".*/\1/p" setup.py)
  [ -n "$v" ] || { echo "run_oldest.sh: no \"$p>=X\" in setup.py" >&2; exit 2; }
  specs+=("$p==$v")
done
dir=${OLDEST_DIR:-${TMPDIR:-/tmp}/mugs-oldest-$(IFS=-; echo "${specs[*]}")}
# each package's version as Python imports it from $dir: "pkg==X" when X, or X.*, or X+local
check='import importlib, sys
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    got = importlib.import_module(name).__version__
    if got != want and not got.startswith((want + ".", want + "+")):
        sys.exit(f"wanted {spec} from the folder, Python imports {name} {got}")
    print(f"{name} {got}", end="; ")'
if ! PYTHONPATH="$dir" "$PY" -c "$check" "${specs[@]}" > /dev/null 2>&1; then
  rm -rf "$dir"
  "$PY" -m pip install -q --no-deps --target "$dir" "${specs[@]}"
fi
got=$(PYTHONPATH="$dir" "$PY" -c "$check" "${specs[@]}") || { echo "run_oldest.sh: $got" >&2; exit 1; }
echo "run_oldest.sh: ${got%; } from $dir"
PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" "$@"
