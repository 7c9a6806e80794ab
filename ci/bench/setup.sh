# Shared setup of the ML benchmarks (sourced from the repository root): bootstrap, transformers
# for the Python peers, a work dir removed on exit, and helpers for the inputs both sides use.
# HALO_BENCH_BUILT=1: the binaries and the venv are already in place (skips the bootstrap's
# workspace build).
[ "${HALO_BENCH_BUILT:-}" = 1 ] || bash ci/bootstrap.sh
source ci/env.sh
.venv/bin/python -c "import transformers" 2>/dev/null || .venv/bin/pip install --quiet transformers
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# plan_rows N OUT: the first N rows of the example pipeline's KTO batch plan (real HH-RLHF data).
plan_rows() {
    halo run pipelines/example.toml >/dev/null 2>&1
    local plan
    plan=$(python3 -c "import json;m=json.load(open('pipelines/.halo/example.lock.json'));print([s for s in m['stages'] if s['name']=='resample'][0]['outputs']['plan']['path'])")
    python3 - "$plan" "$2" "$1" <<'PY'
import sys, pyarrow as pa
t = pa.ipc.open_file(pa.memory_map(sys.argv[1])).read_all().slice(0, int(sys.argv[3]))
with pa.ipc.new_file(pa.OSFile(sys.argv[2], "wb"), t.schema) as w: w.write_table(t)
PY
}

# hh_pairs N OUT: the first N HH-RLHF test pairs as a paired table.
hh_pairs() {
    halo-import --source ../shared/data/hh-rlhf/helpful-base-test.jsonl.gz --format hh-rlhf --kind paired --limit "$1" \
        --data "$2" --summary "$2.json" >/dev/null 2>&1
}

# random_model HIDDEN LAYERS OUT: a random Llama (8 heads, 4 KV heads) on the stories260K tokenizer.
random_model() {
    halo-init --hidden "$1" --layers "$2" --heads 8 --kv-heads 4 --tokenizer ../shared/models/stories260K --out "$3" 2>/dev/null
}

# trl_path: prints a directory holding TRL 1.16, PEFT 0.21 and the packages they need beyond transformers
# (pinned; installed once into .cache/trl, the venv left as it is), or $TRL_PATH when set.
trl_path() {
    local dir=${TRL_PATH:-$PWD/.cache/trl}
    if [ ! -d "$dir/trl" ] || [ ! -d "$dir/peft" ]; then
        .venv/bin/pip install --quiet --target "$dir" --no-deps trl==1.16.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 \
            pandas==3.1.1 python-dateutil==4.0.0 pytz==2026.6 tzdata==2026.6 dill==0.4.1 multiprocess==0.70.19 \
            xxhash==4.1.0 psutil==7.2.2 requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 \
            charset-normalizer==3.5.3 six==1.17.0 >&2
    fi
    echo "$dir"
}
