#!/usr/bin/env bash
# Benchmark (not a test): time per KTO training step of halo-train against the same step in
# PyTorch (transformers model, same random model, plan microbatches, lengths, threads, loss),
# measured in one run on this machine; target ratio <= 0.9. Also peak memory (max RSS) of
# halo-train with the Parquet reference against a live reference model.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/bench/setup.sh
STEPS=${STEPS:-12} THREADS=${THREADS:-2} HIDDEN=${HIDDEN:-256} LAYERS=${LAYERS:-4}
plan_rows "$((STEPS * 8 + 8))" "$work/plan.arrow"
random_model "$HIDDEN" "$LAYERS" "$work/model"
lengths=(--max-prompt-length 128 --max-length 256)
halo-refcache --data "$work/plan.arrow" --model "$work/model" --logps "$work/ref.parquet" --summary "$work/ref.json" \
  "${lengths[@]}" --device cpu --threads "$THREADS" --scratch "$work/s" 2>/dev/null

maxrss() {  # runs "$@", prints the child's peak RSS in MiB
    .venv/bin/python -c 'import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)' "$@"
}
train=(halo-train --data "$work/plan.arrow" --model "$work/model" --loss kto --lr 1e-4 --max-steps "$STEPS"
       --decay constant --device cpu --threads "$THREADS" "${lengths[@]}" --summary "$work/t.json" --report "$work/report")
cache_rss=$(maxrss "${train[@]}" --ref-logps "$work/ref.parquet" --policy "$work/p1" --metrics "$work/cache.parquet")
live_rss=$(maxrss "${train[@]}" --reference live --policy "$work/p2" --metrics "$work/live.parquet")
.venv/bin/python ci/bench/train_pytorch.py "$work/plan.arrow" "$work/model" "$work/peer.json" \
  --steps "$STEPS" --threads "$THREADS" --lr 1e-4 "${lengths[@]}" 2>/dev/null

.venv/bin/python - "$work" "$cache_rss" "$live_rss" "$HIDDEN" "$LAYERS" "$THREADS" <<'PY'
import json, statistics, sys, pyarrow.parquet as pq
w, cache_rss, live_rss = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
ours = [s for s in pq.read_table(f"{w}/cache.parquet").to_pydict()["seconds"] if s is not None][2:]
peer = json.load(open(f"{w}/peer.json"))["seconds"][2:]
a, b = statistics.median(ours), statistics.median(peer)
print(f"KTO step, random Llama hidden {sys.argv[4]} x {sys.argv[5]} layers, microbatch 8, {sys.argv[6]} threads, median of {len(ours)} steps after 2 warm-up:")
print(f"halo-train: {a*1000:.1f} ms/step   PyTorch+transformers: {b*1000:.1f} ms/step   ratio {a/b:.2f} (target <= 0.9)")
print(f"peak RSS halo-train: {cache_rss:.0f} MiB with the Parquet reference, {live_rss:.0f} MiB with a live reference model")
PY
