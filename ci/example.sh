#!/usr/bin/env bash
# The main job: bootstraps, then runs the example pipeline (a rerun is instant: all cached).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh
source ci/env.sh
halo run pipelines/example.toml "$@"
