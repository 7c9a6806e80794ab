#!/usr/bin/env bash
# Benchmark (not a test): wall time of the CI sweep (pipelines/ci-sweep.toml: KTO and DPO at two
# β each, every point sampled and judged) with `halo run -j 2` against `-j 1`, each in a fresh work
# dir so every stage runs, and their ratio. Independent points run side by side under -j 2; on a
# machine whose cores are busy the ratio says little. Needs the workspace built
# (cargo build --release --workspace) and ../shared (data and the stories260K tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/env.sh
SHARED=$(cd .. && pwd)/shared
[ -d "$SHARED/data" ] || { echo "bench-sweep: $SHARED/data is missing" >&2; exit 1; }
[ -x target/release/halo ] || { echo "bench-sweep: build first (cargo build --release --workspace)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
declare -A wall
for jobs in 1 2; do
    start=$(date +%s.%N)
    halo run pipelines/ci-sweep.toml --work-dir "$work/j$jobs" -j "$jobs" \
        --set data="$SHARED/data" --set tokenizer="$SHARED/models/stories260K" >"$work/j$jobs.log" 2>&1 \
        || { cat "$work/j$jobs.log" >&2; exit 1; }
    wall[$jobs]=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
    printf 'ci-sweep, -j %s: %.1f s\n' "$jobs" "${wall[$jobs]}"
done
printf 'ratio -j 2 / -j 1: %.2f (nproc %s, load %s)\n' "$(awk -v a="${wall[2]}" -v b="${wall[1]}" 'BEGIN { print a / b }')" "$(getconf _NPROCESSORS_ONLN)" "$(cut -d' ' -f1 /proc/loadavg)"
