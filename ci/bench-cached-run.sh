#!/usr/bin/env bash
# Benchmark (not a test): wall time of a fully cached `halo run` of the example pipeline.
# Target: under 200 ms on the 2-core dev machine. Prints the median of N runs and its ratio to
# the target, next to the time of a trivial process start measured in the same run (the floor).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh
source ci/env.sh
N=${N:-20}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
halo run pipelines/example.toml --work-dir "$work" >/dev/null 2>&1   # fill the cache

median_ms() {  # runs "$@" N times, prints the median wall time in ms
    local times=()
    for _ in $(seq "$N"); do
        local t0 t1
        t0=$(date +%s%N); "$@" >/dev/null 2>&1; t1=$(date +%s%N)
        times+=($(( (t1 - t0) / 1000 )))
    done
    printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]/1000}'
}

cached=$(median_ms halo run pipelines/example.toml --work-dir "$work")
floor=$(median_ms /bin/true)
ran=$(python3 -c "import json;m=json.load(open('$work/example.lock.json'));print(sum(s['status']=='ran' for s in m['stages']))")
echo "fully cached halo run (example pipeline, 6 stages, $ran ran): median ${cached} ms over $N runs"
echo "process start floor (/bin/true): ${floor} ms"
python3 -c "print(f'ratio to the 200 ms target: {$cached/200:.3f} (target < 1)')"
