#!/usr/bin/env bash
# Benchmark (not a test): overhead per stage of the Slurm executor. Starts a single-node Slurm
# cluster (ci/slurm.sh) in a temp dir, then runs a chain of N no-op stages (`cp` of a small file)
# with `halo run` locally and with `--executor slurm` (fresh work dirs, so every stage runs), and
# prints both wall times, the overhead per stage ((slurm - local) / N) and its ratio to the target
# of 1 s per stage. Needs `halo` built (cargo build --release -p haloflow) and root (for Slurm).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/env.sh
N=${N:-10}
[ -x target/release/halo ] || { echo "bench-slurm: build halo first (cargo build --release -p haloflow)" >&2; exit 1; }
work=$(mktemp -d)
cluster=$(mktemp -d)
trap 'ci/slurm.sh stop "$cluster"; rm -rf "$work" "$cluster"' EXIT
ci/slurm.sh start "$cluster"
eval "$(ci/slurm.sh env "$cluster")"
srun true   # the cluster's first job, so the measured runs see a warm scheduler

echo '{}' >"$work/empty.json"
{
    # Each stage's argv names the stage ($0 of sh), so the stages have distinct cache keys.
    echo '[stages.s1]'
    echo 'run = ["sh", "-c", "cp \"$1\" \"$2\"", "s1", "empty.json", "{out.o}"]'
    echo 'outputs = { o = "json" }'
    for i in $(seq 2 "$N"); do
        echo "[stages.s$i]"
        echo "run = [\"sh\", \"-c\", \"cp \\\"\$1\\\" \\\"\$2\\\"\", \"s$i\", \"{in.x}\", \"{out.o}\"]"
        echo "inputs = { x = \"s$((i - 1)).o\" }"
        echo 'outputs = { o = "json" }'
    done
} >"$work/chain.toml"

seconds() {  # wall time of "$@" in seconds
    local t0 t1
    t0=$(date +%s%N); "$@" >/dev/null 2>&1 || { echo "bench-slurm: $* failed" >&2; "$@" >&2; exit 1; }; t1=$(date +%s%N)
    awk -v d=$((t1 - t0)) 'BEGIN { printf "%.3f", d / 1e9 }'
}

local_s=$(seconds halo run "$work/chain.toml" --work-dir "$work/local")
slurm_s=$(seconds halo run "$work/chain.toml" --work-dir "$work/slurm" --executor slurm)
ran() { python3 -c "import json;m=json.load(open('$1/chain.lock.json'));print(sum(s['status']=='ran' for s in m['stages']))"; }
[ "$(ran "$work/local")" = "$N" ] && [ "$(ran "$work/slurm")" = "$N" ] || { echo "bench-slurm: not every stage ran" >&2; exit 1; }
echo "chain of $N no-op stages, all run: local ${local_s} s, slurm ${slurm_s} s"
python3 -c "
per = ($slurm_s - $local_s) / $N
print(f'Slurm overhead per stage: {per:.3f} s (slurm/local wall ratio {$slurm_s / $local_s:.2f}); ratio to the 1 s target: {per:.3f} (target <= 1)')"
