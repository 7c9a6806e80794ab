# Sourced by the ci/ scripts: puts the project venv and the release binaries first on PATH.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$ROOT/.venv/bin:$ROOT/target/release:$PATH"
# tch builds against the libtorch of the venv's torch (2.13.0, the version tch 0.26 needs).
export LIBTORCH_USE_PYTORCH=1
