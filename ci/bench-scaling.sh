#!/usr/bin/env bash
# Benchmark (not a test): data-parallel scaling of halo-train on SmolLM2-135M (imported from the
# embedded GGUF), KTO, with the same global batch (ACCUM microbatches of 8 rows per optimizer
# step): 2 ranks x 1 thread against 1 rank x 1 thread, examples/s and scaling efficiency
# (examples/s on 2 ranks / (2 x examples/s on 1 rank)); the same measured for PyTorch DDP (Gloo,
# torchrun, ci/bench/train_ddp.py) as the peer in the same run. Also peak RSS per rank on 2 ranks
# without ZeRO, with ZeRO-1 (--shard-optimizer) and with ZeRO-2 (--shard-gradients), their
# examples/s, and where rank 0's step time goes
# (forward + backward, gradient sync and clipping, update; halo-train's debug log, medians after
# the warm-up step). Both sides are launched by torchrun.
# On a machine with fewer than 2 free cores the ranks share cores and the efficiency says so.
# The runs alternate (ours on 1 rank, ours on 2, the peer on 1, the peer on 2; ROUNDS times,
# each a fresh launch of STEPS steps) so that the machine's drift falls on all of them; each
# round gives an efficiency (its 2-rank over its 1-rank examples/s), and the report is their
# median with min–max. ZeRO-1's and ZeRO-2's are measured in one more run each after the rounds.
# halo-train runs with --share-prompts=false: a rank with one microbatch per step would fuse its
# KL partners into the completions' prompt pass while one rank with two could not (it needs
# every microbatch's partners first), so 2 ranks would do less work than 1 and the efficiency
# would count that saving as scaling; without sharing both compute what the peer computes.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/bench/setup.sh
ROUNDS=${ROUNDS:-3} STEPS=${STEPS:-6} ACCUM=${ACCUM:-2} MAX_LENGTH=${MAX_LENGTH:-128} MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-64}
bash ci/fetch-smollm2.sh >/dev/null
halo-import-gguf --gguf .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --model "$work/model" 2>/dev/null
plan_rows "$((STEPS * ACCUM * 8 + 8))" "$work/plan.arrow"
lengths=(--max-prompt-length "$MAX_PROMPT_LENGTH" --max-length "$MAX_LENGTH")
halo-refcache --data "$work/plan.arrow" --model "$work/model" --logps "$work/ref.parquet" --summary "$work/ref.json" \
  "${lengths[@]}" --device cpu --scratch "$work/s" 2>/dev/null

export OMP_NUM_THREADS=1
launch() {  # launch LOG N ARGS...: ARGS on N local ranks under torchrun, their output in LOG
    local log=$1 n=$2; shift 2
    .venv/bin/torchrun --standalone --nnodes 1 --nproc-per-node "$n" "$@" >"$log" 2>&1 \
        || { tail -30 "$log"; exit 1; }
}
ours() {  # ours TAG N [EXTRA...]: halo-train on N ranks (grad_accum counts per rank), per-rank peak RSS in $work/rss-TAG.RANK, log in $work/log-TAG
    local tag=$1 n=$2; shift 2
    RUST_LOG=info,halo_train=debug launch "$work/log-$tag" "$n" --no-python .venv/bin/python ci/bench/maxrss.py "$work/rss-$tag" \
        halo-train --data "$work/plan.arrow" --model "$work/model" --ref-logps "$work/ref.parquet" --loss kto --lr 1e-5 \
        --max-steps "$STEPS" --grad-accum "$((ACCUM / n))" --decay constant --eval-batches 0 --device cpu --threads 1 "${lengths[@]}" \
        --share-prompts=false --policy "$work/p-$tag" --metrics "$work/m-$tag.parquet" --summary "$work/t-$tag.json" --report "$work/r-$tag" "$@"
}
peer() {  # peer TAG N: the PyTorch DDP step on N ranks
    launch "$work/launch.log" "$2" ci/bench/train_ddp.py "$work/plan.arrow" "$work/model" "$work/peer-$1.json" \
        --steps "$STEPS" --accum "$ACCUM" --threads 1 --lr 1e-5 "${lengths[@]}"
}
for round in $(seq "$ROUNDS"); do
    ours "one$round" 1
    ours "two$round" 2
    peer "one$round" 1
    peer "two$round" 2
done
ours zero 2 --shard-optimizer
ours zero2 2 --shard-gradients

.venv/bin/python - "$work" "$ROUNDS" "$STEPS" "$ACCUM" "$MAX_LENGTH" <<'PY'
import glob, json, re, statistics, sys, pyarrow.parquet as pq
w, rounds, steps, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def median_after_warmup(values):
    return statistics.median(values[1:] if len(values) > 2 else values)
def ours(tag):  # examples/s from the metrics: examples (plan rows) per step over its seconds
    m = pq.read_table(f"{w}/m-{tag}.parquet").to_pydict()
    return median_after_warmup([e / s for e, s in zip(m["examples"], m["seconds"]) if s is not None])
def peer(tag):
    p = json.load(open(f"{w}/peer-{tag}.json"))
    return p["rows_per_step"] / median_after_warmup(p["seconds"])
def phases(tag):  # rank 0's median seconds per phase after the warm-up step (the "step timing" debug events)
    rows = []
    for line in open(f"{w}/log-{tag}"):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if "step timing" in line and "rank=0 " in line and "step=1 " not in line:
            rows.append({k: float(v) for k, v in re.findall(r"(\w+)_s=([\d.]+)", line)})
    return {k: statistics.median(r[k] for r in rows) for k in ("forward_backward", "sync_and_clip", "update")}
def rss(tag):
    return [float(open(f).read()) for f in sorted(glob.glob(f"{w}/rss-{tag}.*"))]
print(f"KTO on SmolLM2-135M (f32, CPU), {accum} microbatches x 8 rows per step, at most {sys.argv[5]} tokens, "
      f"{rounds} rounds, each run the median of {steps} steps after 1 warm-up, 1 thread per rank")
per_step = {t: (pq.read_table(f"{w}/m-{t}1.parquet").to_pydict()["examples"][-1], json.load(open(f"{w}/peer-{t}1.json"))["rows_per_step"]) for t in ("one", "two")}
print(f"examples per step (halo-train, peer): 1 rank {per_step['one']}, 2 ranks {per_step['two']}")
efficiency, one_rank = {}, {}
for name, f in [("halo-train", ours), ("PyTorch DDP", peer)]:
    one = [f(f"one{r}") for r in range(1, rounds + 1)]
    two = [f(f"two{r}") for r in range(1, rounds + 1)]
    eff = [t / (2 * o) for o, t in zip(one, two)]
    efficiency[name], one_rank[name] = eff, statistics.median(one)
    print(f"{name:12s} 1 rank: {statistics.median(one):6.2f} examples/s   2 ranks: {statistics.median(two):6.2f} examples/s   "
          f"scaling efficiency {statistics.median(eff):.2f} ({min(eff):.2f}–{max(eff):.2f}; by round: {', '.join(f'{e:.2f}' for e in eff)})")
wins = sum(o >= p for o, p in zip(efficiency["halo-train"], efficiency["PyTorch DDP"]))
print(f"halo-train's efficiency at least the peer's in {wins} of {rounds} rounds")
for tag, what in [("zero", "ZeRO-1"), ("zero2", "ZeRO-2")]:
    rate = ours(tag)
    print(f"halo-train with {what} on 2 ranks: {rate:.2f} examples/s (efficiency {rate / (2 * one_rank['halo-train']):.2f} against the rounds' 1-rank median)")
print("where rank 0's step goes (median s after the warm-up; forward + backward of its microbatches, the gradient sync's wait and clipping, the update):")
for tag, what, mbs in [("one1", "1 rank", accum), ("two1", "2 ranks", accum // 2), ("zero", "2 ranks, ZeRO-1", accum // 2), ("zero2", "2 ranks, ZeRO-2", accum // 2)]:
    p = phases(tag)
    print(f"  {what:16s} forward+backward {p['forward_backward']:6.2f} ({p['forward_backward'] / mbs:.2f} per microbatch)   sync+clip {p['sync_and_clip']:5.2f}   update {p['update']:5.2f}")
print("peak RSS per rank, halo-train on 2 ranks: " + ", ".join(f"{r:.0f}" for r in rss("two1")) + " MiB without ZeRO-1, "
      + ", ".join(f"{r:.0f}" for r in rss("zero")) + " MiB with ZeRO-1 (--shard-optimizer), "
      + ", ".join(f"{r:.0f}" for r in rss("zero2")) + " MiB with ZeRO-2 (--shard-gradients); 1 rank: "
      + ", ".join(f"{r:.0f}" for r in rss("one1")) + " MiB")
PY
