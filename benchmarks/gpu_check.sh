#!/usr/bin/env bash
# The GPU check from a fresh clone: install what it needs, then run benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh [--out DIR] [--dry-run] [--steps ...] [--budget S]
# PyTorch is taken as installed (the machine's CUDA build; never replace it with the CPU wheel).
# Online: `pip install -e .` brings the rest. Offline (a GPU machine that reaches no package
# index): the missing wheels in .whl/ (or $QMRI_WHEELS) are unpacked to a private folder and the
# checkout itself goes on PYTHONPATH, so nothing waits on a network.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" || { echo "gpu_check: PyTorch is not installed (install a CUDA build first)" >&2; exit 2; }
wheels="${QMRI_WHEELS:-.whl}"
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/qmri_site "$wheels"/*.whl
    export PYTHONPATH="$PWD:/tmp/qmri_site${PYTHONPATH:+:$PYTHONPATH}"
else
    python3 -m pip install -q -e .
fi
python3 -c "import qmri_labels, lightning, optuna, nibabel, pandas, yaml, safetensors, pytest" || {
    echo "gpu_check: a dependency is missing (see above); offline, put its wheel in $wheels" >&2; exit 2; }
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py "$@"
