#!/usr/bin/env bash
# Benchmark (not a test): peak memory (max RSS) and step time of KTO steps on SmolLM2-135M
# (the embedded GGUF, dequantized to f32), microbatch 8, lengths <= 256, f32 on the CPU: full
# training and LoRA (r = 16, alpha 32, every projection), each with and without activation
# checkpointing, beside the same step in PyTorch + transformers with gradient_checkpointing off
# and on (ci/bench/train_pytorch.py) and TRL 1.16's KTOTrainer in the four settings (peft LoRA;
# ci/bench/train_trl.py, TRL and peft installed into .cache/trl on first use or taken from
# TRL_PATH; TRL=0 leaves it out), measured in the same run; and halo-train's memory estimate
# against its measured peak. Prints ratios (target: LoRA + checkpointing peak <= 0.8 of TRL's).
#
#   bash ci/bench-memory.sh            (STEPS=3 THREADS=1 by default)
#
# Every side scores plain-text prompts (the model copy's chat template is removed; halo-train
# with --prompt-format plain) with reference log-probs computed beforehand, so a step is the
# policy's forward and backward, the KL partners' forward without gradient, the KTO loss and AdamW. Step time is the median of
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
plain=(--prompt-format plain)  # as the peers render a template-less prompt (ci/bench/contract.py)
halo-refcache --data "$work/plan.arrow" --model "$work/model" --logps "$work/ref.parquet" --summary "$work/ref.json" \
  "${lengths[@]}" "${plain[@]}" --device cpu --threads "$THREADS" --scratch "$work/s" 2>/dev/null

maxrss() {  # runs "$@", prints the child's peak RSS in MiB
    .venv/bin/python -c 'import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)' "$@"
}
train=(halo-train --data "$work/plan.arrow" --model "$work/model" --loss kto --lr 1e-5 --max-steps "$STEPS"
       --decay constant --device cpu --dtype f32 --threads "$THREADS" "${lengths[@]}" "${plain[@]}" --ref-logps "$work/ref.parquet"
       --report "$work/report")
base_rss=$(maxrss halo-train --estimate-memory --model "$work/model" --device cpu --dtype f32 "${lengths[@]}")
lora=(--lora '{"r": 16, "alpha": 32}')
peer=(.venv/bin/python ci/bench/train_pytorch.py "$work/plan.arrow" "$work/model" --steps "$STEPS" --threads "$THREADS"
      --lr 1e-5 "${lengths[@]}")
[ "${TRL:-1}" = 0 ] || trl=(env PYTHONPATH="$(trl_path):${PYTHONPATH:-}" .venv/bin/python ci/bench/train_trl.py "$work/plan.arrow" "$work/model")
# Each configuration: NAME then its command; the run's peak RSS goes to $work/NAME.rss.
measure() { local name=$1; shift; maxrss "$@" > "$work/$name.rss"; }
for v in full ckpt lora lora_ckpt; do
    extra=(); [[ $v == *ckpt* ]] && extra+=(--checkpoint-activations); [[ $v == lora* ]] && extra+=("${lora[@]}")
    measure "$v" "${train[@]}" "${extra[@]}" --policy "$work/p-$v" --metrics "$work/$v.parquet" --summary "$work/$v.json"
done
measure peer_full "${peer[@]:0:4}" "$work/peer_full.json" "${peer[@]:4}"
measure peer_ckpt "${peer[@]:0:4}" "$work/peer_ckpt.json" "${peer[@]:4}" --gradient-checkpointing
if [ -n "${trl:-}" ]; then
    measure trl_full "${trl[@]}" "$work/trl_full.json" "${peer[@]:4}"
    measure trl_ckpt "${trl[@]}" "$work/trl_ckpt.json" "${peer[@]:4}" --gradient-checkpointing
    measure trl_lora "${trl[@]}" "$work/trl_lora.json" "${peer[@]:4}" --lora 16
    measure trl_lora_ckpt "${trl[@]}" "$work/trl_lora_ckpt.json" "${peer[@]:4}" --lora 16 --gradient-checkpointing
fi

.venv/bin/python - "$work" "$base_rss" "$THREADS" <<'PY'
import json, os, statistics, sys, pyarrow.parquet as pq
w, base, threads = sys.argv[1], float(sys.argv[2]), sys.argv[3]
rss = lambda name: float(open(f"{w}/{name}.rss").read())
def seconds(name):
    if os.path.exists(f"{w}/{name}.parquet"):
        s = [x for x in pq.read_table(f"{w}/{name}.parquet").to_pydict()["seconds"] if x is not None]
    else:
        s = json.load(open(f"{w}/{name}.json"))["seconds"]
    return statistics.median(s[1:] or s)
rows = [("full", "halo-train full"), ("ckpt", "halo-train + checkpointing"), ("lora", "halo-train LoRA r=16"),
        ("lora_ckpt", "halo-train LoRA + checkpointing"), ("peer_full", "PyTorch+transformers full"),
        ("peer_ckpt", "PyTorch+transformers + grad ckpt"), ("trl_full", "TRL KTOTrainer full"), ("trl_ckpt", "TRL KTOTrainer + grad ckpt"),
        ("trl_lora", "TRL + peft LoRA r=16"), ("trl_lora_ckpt", "TRL + peft LoRA + grad ckpt")]
rows = [(k, label) for k, label in rows if os.path.exists(f"{w}/{k}.rss")]
m, t = {k: rss(k) for k, _ in rows}, {k: seconds(k) for k, _ in rows}
print(f"KTO step on SmolLM2-135M (f32, CPU, {threads} thread(s)), microbatch 8, lengths <= 256; peak RSS of the process, median step time after the first:")
print(f"{'':34}{'peak RSS':>12}{'s/step':>10}")
for k, label in rows:
    print(f"{label:34}{m[k]:>9.0f} MiB{t[k]:>10.2f}")
if "trl_full" in m:
    for k in ("full", "ckpt", "lora", "lora_ckpt"):
        print(f"halo-train / TRL, {k}: peak RSS {m[k] / m['trl_' + k]:.2f}, step time {t[k] / t['trl_' + k]:.2f}")
    print(f"target: LoRA + checkpointing peak RSS <= 0.8 of TRL's with the same settings: {m['lora_ckpt'] / m['trl_lora_ckpt']:.2f}")
    trl = json.load(open(f"{w}/trl_full.json"))
    tokens = pq.read_table(f"{w}/full.parquet").to_pydict()["tokens_computed"]
    print(f"tokens per step: halo-train {tokens} (rows and KL partners), TRL {trl['tokens']} (non-padding positions of its forwards; of {trl['rows']} rows it drops those whose prompt fills max_length)")
print(f"ratios halo-train / peer: peak RSS full {m['full']/m['peer_full']:.2f}, checkpointing {m['ckpt']/m['peer_ckpt']:.2f}; step time full {t['full']/t['peer_full']:.2f}, checkpointing {t['ckpt']/t['peer_ckpt']:.2f}")
print(f"checkpointing: peak RSS x{m['ckpt']/m['full']:.2f}, step time x{t['ckpt']/t['full']:.2f} (target <= 1.4); with LoRA x{m['lora_ckpt']/m['lora']:.2f}, x{t['lora_ckpt']/t['lora']:.2f}; peer: x{m['peer_ckpt']/m['peer_full']:.2f}, x{t['peer_ckpt']/t['peer_full']:.2f}")
for name in ("full", "ckpt", "lora", "lora_ckpt"):
    e = json.load(open(f"{w}/{name}.json"))["memory_estimate"]
    est = e["total_gib"] * 1024
    print(f"estimate {name}: {est:.0f} MiB (activations {e['activations_gib']*1024:.0f} MiB, the process's own {e['runtime_gib']*1024:.0f} MiB); "
          f"measured peak {m[name]:.0f} MiB; estimate / peak = {est / m[name]:.2f} (target within 15%); "
          f"halo-train --estimate-memory's own peak RSS {base:.0f} MiB")
PY
