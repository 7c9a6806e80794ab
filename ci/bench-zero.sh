#!/usr/bin/env bash
# Benchmark (not a test): peak RSS per rank of 2-rank halo-train with and without ZeRO-1
# (--shard-optimizer) and ZeRO-2 (--shard-gradients) on a random Llama whose optimizer state dominates (HIDDEN x LAYERS, the
# stories260K tokenizer, short rows: activations are small beside weights, gradients and AdamW
# state), SFT on HH-RLHF pairs, f32, 1 thread per rank; also one process as the floor. Prints
# the ratios ZeRO-1 / DDP and ZeRO-2 / DDP of the larger rank's peak, and each run's step time.
#
#   bash ci/bench-zero.sh            (HIDDEN=1024 LAYERS=8 STEPS=3 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/bench/setup.sh
HIDDEN=${HIDDEN:-1024} LAYERS=${LAYERS:-8} STEPS=${STEPS:-3}
export OMP_NUM_THREADS=1
hh_pairs 64 "$work/pairs.arrow"
random_model "$HIDDEN" "$LAYERS" "$work/model"

run() {  # run TAG WORLD [EXTRA...]: halo-train on WORLD local ranks; per-rank peak RSS (MiB) in $work/rss-TAG.RANK
    local tag=$1 world=$2; shift 2
    local port pids=()
    port=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    for rank in $(seq 0 $((world - 1))); do
        env WORLD_SIZE="$world" RANK="$rank" LOCAL_RANK="$rank" MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" \
            .venv/bin/python ci/bench/maxrss.py "$work/rss-$tag" \
            halo-train --data "$work/pairs.arrow" --model "$work/model" --loss sft --lr 1e-4 --max-steps "$STEPS" \
            --microbatch-size 4 --grad-accum "$((2 / world))" --eval-batches 0 --max-prompt-length 32 --max-length 64 \
            --device cpu --threads 1 --policy "$work/p-$tag" --metrics "$work/m-$tag.parquet" --summary "$work/t-$tag.json" \
            --report "$work/r-$tag" "$@" >"$work/log-$tag.$rank" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || { tail -20 "$work"/log-"$tag".*; exit 1; }; done
}
run one 1
run ddp 2
run zero 2 --shard-optimizer
run zero2 2 --shard-gradients

.venv/bin/python - "$work" "$HIDDEN" "$LAYERS" "$STEPS" <<'PY'
import glob, math, statistics, sys
import pyarrow.parquet as pq
from safetensors import safe_open
w, hidden, layers, steps = sys.argv[1:]
n = 0
for f in glob.glob(f"{w}/model/*.safetensors"):
    with safe_open(f, "np") as s:
        n += sum(math.prod(s.get_slice(k).get_shape()) for k in s.keys())
rss = lambda tag: [float(open(f).read()) for f in sorted(glob.glob(f"{w}/rss-{tag}.*"))]
one, ddp, zero, zero2 = rss("one"), rss("ddp"), rss("zero"), rss("zero2")
print(f"SFT on a random Llama ({hidden} hidden, {layers} layers, {n / 1e6:.1f} M parameters = {n * 4 / 2**20:.0f} MiB in f32), {steps} steps, 2 ranks x 1 thread")
print(f"peak RSS per rank: 1 process {one[0]:.0f} MiB; DDP {', '.join(f'{r:.0f}' for r in ddp)} MiB; ZeRO-1 {', '.join(f'{r:.0f}' for r in zero)} MiB; ZeRO-2 {', '.join(f'{r:.0f}' for r in zero2)} MiB")
def step_s(tag):  # median seconds per step after the first
    s = [x for x in pq.read_table(f"{w}/m-{tag}.parquet").to_pydict()["seconds"] if x is not None][1:]
    return statistics.median(s)
print(f"seconds per step (median after the first): 1 process {step_s('one'):.2f}, DDP {step_s('ddp'):.2f}, ZeRO-1 {step_s('zero'):.2f}, ZeRO-2 {step_s('zero2'):.2f}")
print(f"ZeRO-1 / DDP (larger rank): {max(zero) / max(ddp):.3f}")
print(f"ZeRO-2 / DDP (larger rank): {max(zero2) / max(ddp):.3f}")
PY
