#!/usr/bin/env bash
# The test command: bootstraps, then runs every unit and integration test (release build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh
source ci/env.sh
cargo test --release --workspace
