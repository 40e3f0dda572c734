#!/usr/bin/env bash
# Prepares .gpu-wheels for bench/gpu.sh, on a machine that reaches a package index (the GPU machine
# reaches none). Resolves bench/gpu-requirements.txt for CPython 3.12 on manylinux x86_64, drops torch and
# its CUDA packages (the GPU machine has its own torch), adds bench/gpu-nodeps.txt, downloads the wheels
# and writes .gpu-wheels/requirements.txt, the exact list gpu.sh installs. The folder is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DEST=${GPU_WHEELS:-.gpu-wheels}
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$PIP" install --dry-run --ignore-installed --quiet --report "$tmp/report.json" "${PLATFORM[@]}" \
    --target "$tmp/target" -r bench/gpu-requirements.txt
python3 - "$tmp/report.json" > "$DEST/requirements.txt" <<'PY'
import json
import re
import sys

# torch and what only torch needs: the GPU machine's own CUDA build stays in charge.
skip = re.compile(r"^(torch|torchaudio|triton|nvidia-.*|sympy|mpmath|networkx|jinja2|markupsafe|fsspec|setuptools)$",
                  re.IGNORECASE)
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if not skip.match(name):
        print(f"{name}=={version}")
PY
grep -v '^#' bench/gpu-nodeps.txt | sed '/^$/d' >> "$DEST/requirements.txt"
"$PIP" download --quiet --no-deps "${PLATFORM[@]}" -d "$DEST" -r "$DEST/requirements.txt"
echo "$(wc -l < "$DEST/requirements.txt") wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
