#!/usr/bin/env bash
# Qwen3 decode speed on a GPU machine without package registries: CUDA graphs against the reference
# decode, 0.6B and 1.7B, concurrency 1 and 8, in one run of under 8 minutes (bench/gpu_bench.py).
#
# Before: on a machine with a package index, bench/gpu_wheels.sh fills .gpu-wheels (git-ignored); carry
# it to the GPU machine with the working tree. Here the wheels are installed into .gpu-site (also
# git-ignored), which goes first on PYTHONPATH: qwen-tts 0.1.1 needs transformers 4.57.3, not the
# machine's 5.x; the machine's own torch (CUDA build) is used as it is.
#
#   bench/gpu.sh                                  # random weights of the real sizes (per-step cost)
#   bench/gpu.sh --checkpoint-0.6b DIR --checkpoint-1.7b DIR [--ref-wav F --ref-text T]   # real weights
#   bench/gpu.sh --smoke                          # CPU, tiny model: checks the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
SITE=${GPU_SITE:-.gpu-site}
started=$(date +%s)

if [ ! -f "$WHEELS/requirements.txt" ]; then
    echo "no $WHEELS/requirements.txt: run bench/gpu_wheels.sh on a machine with a package index first" >&2
    exit 2
fi
if [ ! -f "$SITE/.installed" ]; then
    reqs=$(grep -v '^#' "$WHEELS/requirements.txt" | sed '/^$/d')
    # Keep the machine's numpy when it is 2.x (what torch and the wheels here are built for).
    if "$PY" -c 'import sys, numpy; sys.exit(0 if int(numpy.__version__.split(".")[0]) >= 2 else 1)' 2>/dev/null; then
        reqs=$(echo "$reqs" | grep -iv '^numpy==')
    fi
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" \
        --target "$SITE" --no-deps $reqs
    touch "$SITE/.installed"
fi
export PYTHONPATH="$PWD/$SITE:$PWD/libs/common/src:$PWD/gpu_worker/src${PYTHONPATH:+:$PYTHONPATH}"
echo "installed in $(( $(date +%s) - started ))s; transformers $("$PY" -c 'import transformers; print(transformers.__version__)')"
# Everything, install included, within 8 minutes: the bench stops starting measurements at its budget.
left=$(( 470 - ($(date +%s) - started) ))
exec timeout "$left" "$PY" bench/gpu_bench.py --budget-s $(( left - 90 )) "$@"
