#!/usr/bin/env bash
# Creates .venv with everything Timbre needs to run and test; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
$PIP install -r requirements/base.txt -r requirements/tts.txt -r requirements/test.txt
$PIP install -r requirements/qwen.txt -r requirements/bench.txt
$PIP install --no-deps -r requirements/qwen-nodeps.txt
# The packages of this repository, importable from their source folders.
SITE=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
{
  for d in libs/common services/gateway services/voices services/synth-dispatcher services/storage \
           services/billing gpu_worker clients/python; do echo "$PWD/$d/src"; done
} > "$SITE/timbre-dev.pth"
# The SDK's command line, run from its source folder like the rest.
printf '#!/bin/sh\nexec "%s/bin/python" -m timbre "$@"\n' "$(cd "$VENV" && pwd)" > "$VENV/bin/timbre"
chmod +x "$VENV/bin/timbre"
echo "install: $VENV ready"
