#!/usr/bin/env bash
# Installs everything haloflow needs on a fresh machine (idempotent):
#   - a project-local Python venv (.venv) with pyarrow, for plug-in stages written in Python;
#   - release builds of the `halo` runner and every stage binary.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import pyarrow" 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check "pyarrow>=15"
fi

cargo build --release --workspace --quiet
