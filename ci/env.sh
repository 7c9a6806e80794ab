# Sourced by the ci/ scripts: puts the project venv and the release binaries first on PATH.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$ROOT/.venv/bin:$ROOT/target/release:$PATH"
