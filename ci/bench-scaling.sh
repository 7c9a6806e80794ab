#!/usr/bin/env bash
# Benchmark (not a test): data-parallel scaling of halo-train on SmolLM2-135M (imported from the
# embedded GGUF), KTO, with the same global batch (ACCUM microbatches of 8 rows per optimizer
# step): 2 ranks x 1 thread against 1 rank x 1 thread, examples/s and scaling efficiency
# (examples/s on 2 ranks / (2 x examples/s on 1 rank)); the same measured for PyTorch DDP (Gloo,
# torchrun, ci/bench/train_ddp.py) as the peer in the same run. Also peak RSS per rank on 2 ranks
# with and without ZeRO-1 (--shard-optimizer). Both sides are launched by torchrun.
# On a machine with fewer than 2 free cores the ranks share cores and the efficiency says so.
# halo-train runs with --share-prompts=false: a rank with one microbatch per step would fuse its
# KL partners into the completions' prompt pass while one rank with two could not (it needs
# every microbatch's partners first), so 2 ranks would do less work than 1 and the efficiency
# would count that saving as scaling; without sharing both compute what the peer computes.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/bench/setup.sh
STEPS=${STEPS:-6} ACCUM=${ACCUM:-2} MAX_LENGTH=${MAX_LENGTH:-128} MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-64}
bash ci/fetch-smollm2.sh >/dev/null
halo-import-gguf --gguf .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --model "$work/model" 2>/dev/null
plan_rows "$((STEPS * ACCUM * 8 + 8))" "$work/plan.arrow"
lengths=(--max-prompt-length "$MAX_PROMPT_LENGTH" --max-length "$MAX_LENGTH")
halo-refcache --data "$work/plan.arrow" --model "$work/model" --logps "$work/ref.parquet" --summary "$work/ref.json" \
  "${lengths[@]}" --device cpu --scratch "$work/s" 2>/dev/null

export OMP_NUM_THREADS=1
launch() {  # launch N ARGS...: ARGS on N local ranks under torchrun
    local n=$1; shift
    .venv/bin/torchrun --standalone --nnodes 1 --nproc-per-node "$n" "$@" >"$work/launch.log" 2>&1 \
        || { tail -30 "$work/launch.log"; exit 1; }
}
ours() {  # ours TAG N [EXTRA...]: halo-train on N ranks (grad_accum counts per rank), per-rank peak RSS in $work/rss-TAG.RANK
    local tag=$1 n=$2; shift 2
    launch "$n" --no-python .venv/bin/python ci/bench/maxrss.py "$work/rss-$tag" \
        halo-train --data "$work/plan.arrow" --model "$work/model" --ref-logps "$work/ref.parquet" --loss kto --lr 1e-5 \
        --max-steps "$STEPS" --grad-accum "$((ACCUM / n))" --decay constant --eval-batches 0 --device cpu --threads 1 "${lengths[@]}" \
        --share-prompts=false --policy "$work/p-$tag" --metrics "$work/m-$tag.parquet" --summary "$work/t-$tag.json" --report "$work/r-$tag" "$@"
}
peer() {  # peer TAG N: the PyTorch DDP step on N ranks
    launch "$2" ci/bench/train_ddp.py "$work/plan.arrow" "$work/model" "$work/peer-$1.json" \
        --steps "$STEPS" --accum "$ACCUM" --threads 1 --lr 1e-5 "${lengths[@]}"
}
ours one 1
ours two 2
ours zero 2 --shard-optimizer
peer one 1
peer two 2

.venv/bin/python - "$work" "$STEPS" "$ACCUM" "$MAX_LENGTH" <<'PY'
import glob, json, statistics, sys, pyarrow.parquet as pq
w, steps, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def median_after_warmup(values):
    return statistics.median(values[1:] if len(values) > 2 else values)
def ours(tag):  # examples/s from the metrics: examples (plan rows) per step over its seconds
    m = pq.read_table(f"{w}/m-{tag}.parquet").to_pydict()
    return median_after_warmup([e / s for e, s in zip(m["examples"], m["seconds"]) if s is not None])
def peer(tag):
    p = json.load(open(f"{w}/peer-{tag}.json"))
    return p["rows_per_step"] / median_after_warmup(p["seconds"])
def rss(tag):
    return [float(open(f).read()) for f in sorted(glob.glob(f"{w}/rss-{tag}.*"))]
print(f"KTO on SmolLM2-135M (f32, CPU), {accum} microbatches x 8 rows per step, at most {sys.argv[4]} tokens, "
      f"median of {steps} steps after 1 warm-up, 1 thread per rank")
per_step = {t: (pq.read_table(f"{w}/m-{t}.parquet").to_pydict()["examples"][-1], json.load(open(f"{w}/peer-{t}.json"))["rows_per_step"]) for t in ("one", "two")}
print(f"examples per step (halo-train, peer): 1 rank {per_step['one']}, 2 ranks {per_step['two']}")
for name, f in [("halo-train", ours), ("PyTorch DDP", peer)]:
    one, two = f("one"), f("two")
    print(f"{name:12s} 1 rank: {one:6.2f} examples/s   2 ranks: {two:6.2f} examples/s   scaling efficiency {two / (2 * one):.2f}")
print("peak RSS per rank, halo-train on 2 ranks: " + ", ".join(f"{r:.0f}" for r in rss("two")) + " MiB without ZeRO-1, "
      + ", ".join(f"{r:.0f}" for r in rss("zero")) + " MiB with ZeRO-1 (--shard-optimizer); 1 rank: "
      + ", ".join(f"{r:.0f}" for r in rss("one")) + " MiB")
PY
