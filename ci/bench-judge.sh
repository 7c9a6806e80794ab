#!/usr/bin/env bash
# Benchmark (not a test): judgments/s of halo-judge's openai backend against the local fake
# OpenAI-compatible server of its tests (stages/judge/tests/common/server.rs), 16 concurrent
# requests, 20 ms simulated latency. Ideal 800/s; target ratio >= 0.8. PAIRS=N sets the size.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/env.sh
cargo bench --quiet -p halo-judge --bench throughput
