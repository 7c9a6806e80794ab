#!/usr/bin/env bash
# GPU check, for a machine with CUDA (CI has none): builds, loads a model on CUDA in bf16,
# runs refcache and sample on it and prints tokens/s; trains 2 steps with fused AdamW on and
# off (tokens/s, MFU); runs NCCL on one rank (crates/dist's collectives test) and, with 2 or
# more GPUs, 2 NCCL ranks of halo-train under torchrun. Usage: bash ci/gpu-check.sh
# On a machine with a network and a Rust toolchain it bootstraps and builds, and needs ../shared
# (stories260K tokenizer, HH-RLHF data) beside the repository. With .device/ (ci/gpu-pack.sh:
# binaries built against the torch of the lent device machine's image, the shared files) it
# builds nothing and runs the binaries on that machine's own python3 torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .device/bin.tar.xz ]; then
    bins=$(mktemp -d)
    python3 -c "import sys, tarfile; tarfile.open('.device/bin.tar.xz').extractall(sys.argv[1])" "$bins"
    torch_lib=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
    echo "carried binaries ($(cat .device/torch-version)) on this machine's torch $(python3 -c 'import torch; print(torch.__version__)')"
    export PATH="$bins/bin:$PATH" LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"
    shared=.device/shared python=python3
    collectives() { "$bins/bin/collectives" "$@"; }
else
    bash ci/bootstrap.sh
    source ci/env.sh
    shared=../shared python=.venv/bin/python
    collectives() { cargo test --release -q -p haloflow-dist --test collectives -- "$@"; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU visible"; exit 1; }
$python -c "import torch; assert torch.cuda.is_available(); print('torch sees', torch.cuda.get_device_name(0))"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

halo run pipelines/example.toml --work-dir "$work/halo" --set data="$PWD/$shared/data" >/dev/null 2>&1
plan=$(python3 -c "import json;m=json.load(open('$work/halo/example.lock.json'));print([s for s in m['stages'] if s['name']=='resample'][0]['outputs']['plan']['path'])")
# A ~300M-parameter random Llama (hidden 1024, 16 layers) on the stories260K tokenizer.
halo-init --hidden 1024 --layers 16 --heads 16 --kv-heads 4 --max-positions 1024 \
  --tokenizer "$shared/models/stories260K" --out "$work/model"

echo "== refcache on CUDA, bf16"
halo-refcache --data "$plan" --model "$work/model" --logps "$work/ref.parquet" --summary "$work/ref.json" \
  --device cuda --dtype bf16 --max-prompt-length 256 --max-length 512 --token-budget 65536 --scratch "$work/s"
python3 -c "import json;s=json.load(open('$work/ref.json'));print(f\"refcache: {s['tokens']} tokens, {s['tokens_per_s']:.0f} tokens/s, padding waste {s['padding_waste']:.1%}, {s['device']} {s['dtype']}\")"

echo "== sample on CUDA, bf16"
halo-import --source "$shared/data/prompts/vicuna_bench_question.jsonl" --format mt-bench --kind prompts \
  --data "$work/prompts.arrow" --summary "$work/prompts.json" 2>/dev/null
halo-sample --prompts "$work/prompts.arrow" --model "$work/model" --samples "$work/samples.arrow" \
  --summary "$work/samples.json" --device cuda --dtype bf16 --max-new-tokens 128 --batch-size 80 --temperature 0.7
python3 -c "import json;s=json.load(open('$work/samples.json'));print('sample:', {k: s[k] for k in s if k in ('samples','tokens_generated','tokens_per_s','device','dtype')})"

echo "== train (KTO) on CUDA, bf16 weights with f32 master weights"
halo-train --data "$plan" --model "$work/model" --ref-logps "$work/ref.parquet" --loss kto --lr 1e-5 \
  --max-steps 20 --device cuda --dtype bf16 --max-prompt-length 256 --max-length 512 \
  --policy "$work/policy" --metrics "$work/metrics.parquet" --report "$work/report" --summary "$work/train.json"
$python - "$work" "${PEAK_TFLOPS:-989}" <<'PY'
import os, statistics, sys, pyarrow.parquet as pq
w, peak = sys.argv[1], float(sys.argv[2])
m = pq.read_table(f"{w}/metrics.parquet").to_pydict()
tps = statistics.median([t for t in m["tokens_per_s"] if t is not None][3:])
params = os.path.getsize(f"{w}/model/model.safetensors") / 4  # halo-init writes f32
# tokens/s counts the completions (forward + backward: ~6 x params FLOPs per token) and their KL
# partners (no-grad forward: ~2 x params), about as many of each: ~4 x params per counted token.
mfu = tps * 4 * params / (peak * 1e12)
print(f"train: {tps:.0f} tokens/s (median after 3 steps), ~{params/1e6:.0f}M params, MFU ~{mfu:.1%} of {peak:.0f} TFLOP/s bf16 peak")
PY

echo "== NCCL on one rank: every collective on CUDA tensors"
collectives nccl_on_one_rank | tee "$work/nccl.log"
grep -q "nccl ok on one rank" "$work/nccl.log" || { echo "NCCL smoke failed"; exit 1; }

echo "== train 2 steps on CUDA, bf16: fused AdamW on and off, and ZeRO-1's flat weights (one rank)"
for fused in true false zero; do
    extra=(--fused-adamw="$fused")
    [ "$fused" = zero ] && extra=(--fused-adamw=false --shard-optimizer)
    halo-train --data "$plan" --model "$work/model" --ref-logps "$work/ref.parquet" --loss kto --lr 1e-5 \
      --max-steps 2 --device cuda --dtype bf16 --max-prompt-length 256 --max-length 512 "${extra[@]}" \
      --policy "$work/p-$fused" --metrics "$work/m-$fused.parquet" --report "$work/r-$fused" --summary "$work/t-$fused.json" 2>/dev/null
done
$python - "$work" "${PEAK_TFLOPS:-989}" <<'PY'
import json, os, sys, pyarrow.parquet as pq
w, peak = sys.argv[1], float(sys.argv[2])
params = os.path.getsize(f"{w}/model/model.safetensors") / 4  # halo-init writes f32
# ZeRO-1 on one rank updates as AdamW does, its bf16 weights views of one flat CUDA buffer.
plain, zero = (json.load(open(f"{w}/t-{k}.json")) for k in ("false", "zero"))
assert zero["shard_optimizer"], zero
print(f"ZeRO-1 (one rank, flat weights): step 2 loss {zero['last']['loss']:.6f}, AdamW {plain['last']['loss']:.6f}")
assert abs(zero["last"]["loss"] - plain["last"]["loss"]) < 1e-2 * max(1.0, abs(plain["last"]["loss"])), (zero["last"], plain["last"])
for fused in ("true", "false"):
    assert json.load(open(f"{w}/t-{fused}.json"))["fused_adamw"] == (fused == "true")
    m = pq.read_table(f"{w}/m-{fused}.parquet").to_pydict()
    tps, seconds = m["tokens_per_s"][-1], m["seconds"][-1]  # step 2: after the warm-up step
    # The same MFU approximation as above: ~4 x params FLOPs per counted token (completions with
    # forward + backward, KL partners forward only, about as many of each).
    print(f"fused AdamW {fused:5s}: step 2 {seconds:.3f} s, {tps:.0f} tokens/s, MFU {4 * params * tps / (peak * 1e12):.2%} "
          f"(4 x {params / 1e6:.0f}M params x tokens/s / {peak:.0f} TFLOP/s bf16 peak)")
PY

gpus=$(nvidia-smi --list-gpus | wc -l)
if [ "$gpus" -ge 2 ]; then
    echo "== 2 NCCL ranks of halo-train (torchrun), 2 steps"
    $python -m torch.distributed.run --standalone --nproc-per-node 2 --no-python halo-train --data "$plan" --model "$work/model" \
      --ref-logps "$work/ref.parquet" --loss kto --lr 1e-5 --max-steps 2 --device cuda --dtype bf16 --dist-backend nccl \
      --max-prompt-length 256 --max-length 512 --policy "$work/p-nccl" --metrics "$work/m-nccl.parquet" \
      --report "$work/r-nccl" --summary "$work/t-nccl.json"
    python3 -c "import json;s=json.load(open('$work/t-nccl.json'));assert s['ranks']==2;print('2 NCCL ranks: ok, last step', s['last'])"
else
    echo "== one GPU: halo-train's multi-rank NCCL run needs 2 (NCCL refuses two ranks on one GPU)"
fi
