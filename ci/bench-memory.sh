#!/usr/bin/env bash
# Benchmark (not a test): peak memory (max RSS) and step time of KTO steps on SmolLM2-135M
# (the embedded GGUF, dequantized to f32), microbatch 8, lengths <= 256, f32 on the CPU, with
# and without activation checkpointing, beside the same step in PyTorch + transformers with
# gradient_checkpointing off and on (ci/bench/train_pytorch.py), measured in the same run; and
# halo-train's memory estimate against its measured peak. Prints ratios. With TRL_PATH set to a
# directory holding trl 1.16 and its dependencies (see ci/bench/train_trl_kto.py), TRL's
# KTOTrainer (gradient_checkpointing off and on) is measured too.
#
#   bash ci/bench-memory.sh            (STEPS=3 THREADS=1 by default)
#
# Both sides score plain-text prompts (the model copy's chat template is removed) with
# reference log-probs computed beforehand, so a step is the policy's forward and backward, the
# KL partners' forward without gradient, the KTO loss and AdamW. Step time is the median of
# the steps after the first; peak RSS is the whole process's (model, optimizer, runtime).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/bench/setup.sh
STEPS=${STEPS:-3} THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS
plan_rows "$((STEPS * 8))" "$work/plan.arrow"
halo-import-gguf --gguf .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --model "$work/model" 2>/dev/null
python3 - "$work/model" <<'PY'
import json, os, sys
path = os.path.join(sys.argv[1], "tokenizer_config.json")
config = json.load(open(path))
config.pop("chat_template", None)
json.dump(config, open(path, "w"))
jinja = os.path.join(sys.argv[1], "chat_template.jinja")
if os.path.exists(jinja):
    os.remove(jinja)
PY
lengths=(--max-prompt-length 128 --max-length 256)
halo-refcache --data "$work/plan.arrow" --model "$work/model" --logps "$work/ref.parquet" --summary "$work/ref.json" \
  "${lengths[@]}" --device cpu --threads "$THREADS" --scratch "$work/s" 2>/dev/null

maxrss() {  # runs "$@", prints the child's peak RSS in MiB
    .venv/bin/python -c 'import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)' "$@"
}
train=(halo-train --data "$work/plan.arrow" --model "$work/model" --loss kto --lr 1e-5 --max-steps "$STEPS"
       --decay constant --device cpu --dtype f32 --threads "$THREADS" "${lengths[@]}" --ref-logps "$work/ref.parquet"
       --report "$work/report")
base_rss=$(maxrss halo-train --estimate-memory --model "$work/model" --device cpu --dtype f32 "${lengths[@]}")
full_rss=$(maxrss "${train[@]}" --policy "$work/p1" --metrics "$work/full.parquet" --summary "$work/full.json")
ckpt_rss=$(maxrss "${train[@]}" --checkpoint-activations --policy "$work/p2" --metrics "$work/ckpt.parquet" --summary "$work/ckpt.json")
peer=(.venv/bin/python ci/bench/train_pytorch.py "$work/plan.arrow" "$work/model" --steps "$STEPS" --threads "$THREADS"
      --lr 1e-5 "${lengths[@]}")
peer_full_rss=$(maxrss "${peer[@]:0:4}" "$work/peer_full.json" "${peer[@]:4}")
peer_ckpt_rss=$(maxrss "${peer[@]:0:4}" "$work/peer_ckpt.json" "${peer[@]:4}" --gradient-checkpointing)
trl_full_rss=0 trl_ckpt_rss=0
if [ -n "${TRL_PATH:-}" ]; then
    trl=(env PYTHONPATH="$TRL_PATH:${PYTHONPATH:-}" .venv/bin/python ci/bench/train_trl_kto.py "$work/plan.arrow" "$work/model")
    trl_full_rss=$(maxrss "${trl[@]}" "$work/trl_full.json" "${peer[@]:4}")
    trl_ckpt_rss=$(maxrss "${trl[@]}" "$work/trl_ckpt.json" "${peer[@]:4}" --gradient-checkpointing)
fi

.venv/bin/python - "$work" "$base_rss" "$full_rss" "$ckpt_rss" "$peer_full_rss" "$peer_ckpt_rss" "$THREADS" "$trl_full_rss" "$trl_ckpt_rss" <<'PY'
import json, statistics, sys, pyarrow.parquet as pq
w = sys.argv[1]
base, full, ckpt, peer_full, peer_ckpt = map(float, sys.argv[2:7])
def ours(name):
    s = [x for x in pq.read_table(f"{w}/{name}.parquet").to_pydict()["seconds"] if x is not None]
    return statistics.median(s[1:] or s)
def peer(name):
    s = json.load(open(f"{w}/{name}.json"))["seconds"]
    return statistics.median(s[1:] or s)
t = {"full": ours("full"), "ckpt": ours("ckpt"), "peer_full": peer("peer_full"), "peer_ckpt": peer("peer_ckpt")}
print(f"KTO step on SmolLM2-135M (f32, CPU, {sys.argv[7]} thread(s)), microbatch 8, lengths <= 256; peak RSS of the process, median step time after the first:")
print(f"{'':34}{'peak RSS':>12}{'s/step':>10}")
for label, rss, sec in [("halo-train full", full, t["full"]), ("halo-train + checkpointing", ckpt, t["ckpt"]),
                        ("PyTorch+transformers full", peer_full, t["peer_full"]), ("PyTorch+transformers + grad ckpt", peer_ckpt, t["peer_ckpt"])]:
    print(f"{label:34}{rss:>9.0f} MiB{sec:>10.2f}")
if float(sys.argv[8]) > 0:
    trl = {k: json.load(open(f"{w}/trl_{k}.json")) for k in ("full", "ckpt")}
    m = pq.read_table(f"{w}/full.parquet").to_pydict()
    tokens = [round(r * s) for r, s in zip(m["tokens_per_s"], m["seconds"]) if r is not None and s is not None]
    for k, rss in (("full", float(sys.argv[8])), ("ckpt", float(sys.argv[9]))):
        sec = statistics.median(trl[k]["seconds"][1:] or trl[k]["seconds"])
        print(f"{'TRL KTOTrainer ' + ('full' if k == 'full' else '+ grad ckpt'):34}{rss:>9.0f} MiB{sec:>10.2f}")
        print(f"  halo-train / TRL: peak RSS {(full if k == 'full' else ckpt) / rss:.2f}, step time {t[k] / sec:.2f}")
    print(f"tokens per step: halo-train {tokens} (rows and KL partners), TRL {trl['full']['tokens']} (its num_tokens; of {trl['full']['rows']} rows it drops those whose prompt fills max_length)")
print(f"ratios halo-train / peer: peak RSS full {full/peer_full:.2f}, checkpointing {ckpt/peer_ckpt:.2f}; step time full {t['full']/t['peer_full']:.2f}, checkpointing {t['ckpt']/t['peer_ckpt']:.2f}")
print(f"checkpointing: peak RSS x{ckpt/full:.2f}, step time x{t['ckpt']/t['full']:.2f} (target <= 1.4); peer: x{peer_ckpt/peer_full:.2f}, x{t['peer_ckpt']/t['peer_full']:.2f}")
for name, rss in [("full", full), ("ckpt", ckpt)]:
    e = json.load(open(f"{w}/{name}.json"))["memory_estimate"]
    est = e["total_gib"] * 1024
    print(f"estimate {name}: {est:.0f} MiB (activations {e['activations_gib']*1024:.0f} MiB); measured peak {rss:.0f} MiB, "
          f"{rss - base:.0f} MiB above the runtime's {base:.0f} MiB (halo-train --estimate-memory's peak RSS); "
          f"estimate / (peak - runtime) = {est / (rss - base):.2f}, estimate / peak = {est / rss:.2f}")
PY
