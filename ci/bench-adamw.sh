#!/usr/bin/env bash
# Benchmark (not a test): AdamW's fused multi-tensor kernel (libtorch's at::_fused_adamw_,
# `--fused-adamw=true`, the default) against the unfused chain of element-wise ops (`=false`)
# on the CPU, in
# halo-train steps where the update is a large share: SFT on a random Llama (HIDDEN x LAYERS,
# the stories260K tokenizer) with one short row per step, f32, 1 thread. The two alternate
# (A B A B, ROUNDS times) so load drift falls on both; prints the median step time of each
# (steps after the first) and the ratio fused / unfused.
#
#   bash ci/bench-adamw.sh            (HIDDEN=1024 LAYERS=8 STEPS=5 ROUNDS=2 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/bench/setup.sh
HIDDEN=${HIDDEN:-1024} LAYERS=${LAYERS:-8} STEPS=${STEPS:-5} ROUNDS=${ROUNDS:-2}
export OMP_NUM_THREADS=1
hh_pairs 64 "$work/pairs.arrow"
random_model "$HIDDEN" "$LAYERS" "$work/model"
for round in $(seq 1 "$ROUNDS"); do
    for fused in true false; do
        halo-train --data "$work/pairs.arrow" --model "$work/model" --loss sft --lr 1e-4 --max-steps "$STEPS" \
            --microbatch-size 1 --eval-batches 0 --max-prompt-length 16 --max-length 32 --device cpu --threads 1 \
            --fused-adamw="$fused" --policy "$work/p" --metrics "$work/m-$fused-$round.parquet" --summary "$work/t.json" \
            --report "$work/r" 2>/dev/null
    done
done
.venv/bin/python - "$work" "$HIDDEN" "$LAYERS" "$ROUNDS" <<'PY'
import glob, statistics, sys, pyarrow.parquet as pq
w, hidden, layers, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def seconds(fused):
    return [s for r in range(1, rounds + 1) for s in pq.read_table(f"{w}/m-{fused}-{r}.parquet").to_pydict()["seconds"][1:]]
on, off = seconds("true"), seconds("false")
print(f"SFT steps on a random Llama ({hidden} hidden, {layers} layers, f32, CPU, 1 thread), 1 row of <= 32 tokens per step, "
      f"{len(on)} steps each after warm-up, alternating")
print(f"median step: fused AdamW {statistics.median(on):.3f} s (min {min(on):.3f}), unfused {statistics.median(off):.3f} s (min {min(off):.3f})")
print(f"fused / unfused step time: {statistics.median(on) / statistics.median(off):.3f}")
PY
