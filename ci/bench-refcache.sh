#!/usr/bin/env bash
# Benchmark (not a test): tokens/s of halo-refcache against a Python transformers batched
# forward that pads each batch to its longest sequence, on the same model, data and threads,
# measured in one run on this machine. Target: ratio >= 1.5. Needs transformers in the venv
# (installed here if missing) and ../shared/data (the example pipeline's plan).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/bench/setup.sh
ROWS=${ROWS:-256} THREADS=${THREADS:-2} HIDDEN=${HIDDEN:-256} LAYERS=${LAYERS:-4}

plan_rows "$ROWS" "$work/plan.arrow"
random_model "$HIDDEN" "$LAYERS" "$work/model"

halo-refcache --data "$work/plan.arrow" --model "$work/model" --logps "$work/ref.parquet" \
  --summary "$work/halo.json" --max-prompt-length 128 --max-length 256 --threads "$THREADS" \
  --device cpu --scratch "$work/scratch" 2>/dev/null
.venv/bin/python ci/bench/refcache_transformers.py "$work/plan.arrow" "$work/model" "$work/peer.json" \
  --threads "$THREADS" --batch-size 8 --max-prompt-length 128 --max-length 256 2>/dev/null

echo "hidden $HIDDEN, layers $LAYERS, threads $THREADS, $ROWS plan rows"
.venv/bin/python - "$work" <<'PY'
import json, sys, pyarrow.parquet as pq
w = sys.argv[1]
h, p = json.load(open(f"{w}/halo.json")), json.load(open(f"{w}/peer.json"))
t = pq.read_table(f"{w}/ref.parquet").to_pydict()
ours = [x for pair in zip(t["logp"], t["kl_logp"]) for x in pair]
diff = max(abs(a - b) for a, b in zip(ours, p["logps"]))
assert h["tokens"] == p["tokens"], (h["tokens"], p["tokens"])
print(f"model: random Llama (halo-init), {h['device']} {h['dtype']}; {h['sequences']} sequences, {h['tokens']} tokens")
print(f"halo-refcache: {h['tokens_per_s']:.0f} tokens/s (padding waste {h['padding_waste']:.1%})")
print(f"transformers : {p['tokens_per_s']:.0f} tokens/s (padding waste {1 - p['tokens'] / p['padded_tokens']:.1%})")
print(f"ratio: {h['tokens_per_s'] / p['tokens_per_s']:.2f}x (target >= 1.5); max |logp difference| {diff:.2e}")
PY
