#!/usr/bin/env bash
# Benchmark (not a test): peak memory (VmHWM) of the LM-head step — logits, log-softmax and the
# target's gather — for a random Llama with a 128k vocabulary (Llama 3's 128256), 4 rows of
# 512 prompt + 512 completion tokens, f32 on CPU: the full (B×T×V) logits of the old path
# against completion-only chunks of --logits-chunk positions (default 1024), each mode in its
# own process. Target: the step's memory (peak − RSS before it) chunked <= 0.3 of full, without
# gradient (refcache, scoring, KL partners, live reference). With gradient, autograd keeps each
# chunk's logits for backward, so only the prompt positions and padding are saved; that ratio
# is printed too, with no target.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/env.sh
CHUNK=${CHUNK:-1024}
CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo build --release -q -p haloflow-ml --example lmhead_memory
bin=target/release/examples/lmhead_memory
declare -A out
for grad in "" --grad; do
  for mode in full chunked; do
    out[$mode$grad]=$("$bin" "$mode" --chunk "$CHUNK" $grad)
    echo "${out[$mode$grad]}"
  done
done
python3 - "${out[full]}" "${out[chunked]}" "${out[full--grad]}" "${out[chunked--grad]}" <<'PY'
import json, sys
f, c, fg, cg = (json.loads(a) for a in sys.argv[1:])
step = lambda r: r["peak_rss_mib"] - r["rss_before_mib"]
assert abs(f["sum_logps"] - c["sum_logps"]) <= 1e-5 * abs(f["sum_logps"]), (f["sum_logps"], c["sum_logps"])
print(f"LM head, vocab {f['vocab']}, {f['positions']} positions ({f['completion_positions']} completion), chunk {c['chunk']}, f32, CPU:")
print(f"no grad: step memory full {step(f):.0f} MiB, chunked {step(c):.0f} MiB, ratio {step(c)/step(f):.2f} (target <= 0.3); "
      f"peak RSS {f['peak_rss_mib']:.0f} vs {c['peak_rss_mib']:.0f} MiB, ratio {c['peak_rss_mib']/f['peak_rss_mib']:.2f}")
print(f"with grad (forward + backward): step memory full {step(fg):.0f} MiB, chunked {step(cg):.0f} MiB, ratio {step(cg)/step(fg):.2f}; "
      f"peak RSS ratio {cg['peak_rss_mib']/fg['peak_rss_mib']:.2f}")
PY
