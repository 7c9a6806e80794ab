#!/usr/bin/env bash
# Packs what ci/gpu-check.sh needs on the device machine some sessions are lent
# (/work/.library/device): that machine reaches no package registry, has no Rust toolchain,
# and its python3 holds torch DEVICE_TORCH (default 2.11.0, CUDA 13.0) instead of the 2.13.0
# tch 0.26 is written for; at most 64 MiB travel with a call. Run here, this script
# downloads that torch's wheel from PyPI (its headers and libraries alone are kept, in
# .cache/), builds the binaries the check runs and crates/dist's collectives test against it
# (tch's version check bypassed: whether the API haloflow uses links and runs against that
# torch is what the check finds out), strips them into one xz archive, and copies the
# ../shared files the check reads beside it, all in .device/ (git-ignored; 27 MiB for torch 2.11.0).
# Then, on the device machine:
#   run(command = "bash ci/gpu-check.sh", carry = [".device"], timeout_s = 540)
# Usage: bash ci/gpu-pack.sh   (DEVICE_TORCH=2.11.0 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE_TORCH=${DEVICE_TORCH:-2.11.0}
[ -x .venv/bin/python ] || bash ci/bootstrap.sh
torch_dir=$PWD/.cache/device-torch-$DEVICE_TORCH
if [ ! -d "$torch_dir/torch/lib" ]; then
    mkdir -p "$torch_dir"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 "torch==$DEVICE_TORCH" -d "$torch_dir"
    unzip -q -o "$torch_dir"/torch-"$DEVICE_TORCH"-*.whl 'torch/include/*' 'torch/lib/*' 'torch/version.py' -d "$torch_dir"
    rm "$torch_dir"/torch-*.whl
fi
# crates/dist compiles NCCL in with the CUDA headers it finds beside torch (../nvidia): the
# venv's, which must be the CUDA of the device's torch.
cuda() { grep -o "^cuda: Optional\[str\] = '[0-9.]*'" "$1/version.py" | grep -o "[0-9][0-9.]*"; }
venv_torch=$(.venv/bin/python -c "import torch, os; print(os.path.dirname(torch.__file__))")
[ "$(cuda "$torch_dir/torch")" = "$(cuda "$venv_torch")" ] \
    || { echo "torch $DEVICE_TORCH is built for CUDA $(cuda "$torch_dir/torch"), the venv's CUDA headers are $(cuda "$venv_torch")'s"; exit 1; }
ln -sfn "$(dirname "$venv_torch")/nvidia" "$torch_dir/nvidia"

# tch's generated C wrappers name every op of the torch it is written for: those the device's
# torch lacks (or declares otherwise) become wrappers that fail with a message when called, in a
# copy of torch-sys patched in for this build alone. haloflow calls none of them today; if it
# ever does, the check says which.
sys_src=$(cargo metadata --format-version 1 --filter-platform x86_64-unknown-linux-gnu | python3 -c "import json, os, sys; print(*[os.path.dirname(p['manifest_path']) for p in json.load(sys.stdin)['packages'] if p['name'] == 'torch-sys'])")
sys_copy=$torch_dir/torch-sys
rm -rf "$sys_copy" && cp -r "$sys_src" "$sys_copy"
gen=$sys_copy/libtch/torch_api_generated.cpp
errors=$(c++ -fsyntax-only -fmax-errors=0 -w -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=1 -DGLOG_USE_GLOG_EXPORT -I "$torch_dir/torch/include" \
    -I "$torch_dir/torch/include/torch/csrc/api/include" "$gen" 2>&1 | grep -o "torch_api_generated.cpp:[0-9]*:[0-9]*: error" | cut -d: -f2 || true)
python3 - "$gen" "$DEVICE_TORCH" <<'PY' $errors
import re, sys
path, version, lines = sys.argv[1], sys.argv[2], {int(n) for n in sys.argv[3:]}
src = open(path).read().split("\n")
stubbed = []
for n in sorted(lines):
    start = max(i for i in range(n) if src[i].startswith("void atg_") or src[i].startswith("tensor *atg_") or re.match(r"^\w[\w\s\*]* atg_\w+\(", src[i]))
    name = re.search(r"atg_\w+", src[start]).group(0)
    end = next(i for i in range(n, len(src)) if src[i] == "}")
    if name not in stubbed:
        body = f'  PROTECT(throw std::runtime_error("{name[4:]} is not in libtorch {version}");)'
        src[start + 1:end] = [body] + [""] * (end - start - 2)  # keep the line numbers of what follows
        stubbed.append(name)
open(path, "w").write("\n".join(src))
print(f"torch-sys for torch {version}: {len(stubbed)} wrappers stubbed: {', '.join(s[4:] for s in stubbed)}")
PY

# The patch would rewrite Cargo.lock (a path instead of the registry's torch-sys): put it back.
cp Cargo.lock "$torch_dir/Cargo.lock.orig"
trap 'cp "$torch_dir/Cargo.lock.orig" Cargo.lock' EXIT
export LIBTORCH=$torch_dir/torch LIBTORCH_BYPASS_VERSION_CHECK=1 CARGO_TARGET_DIR=$PWD/target/device-torch-$DEVICE_TORCH
unset LIBTORCH_USE_PYTORCH
patch=(--config "patch.crates-io.torch-sys.path=\"$sys_copy\"")
bins=(halo halo-import halo-unpair halo-resample halo-init halo-refcache halo-sample halo-train)
cargo "${patch[@]}" build --release --bins -p haloflow $(printf -- '-p %s ' "${bins[@]:1}")
collectives=$(cargo "${patch[@]}" test --release -p haloflow-dist --test collectives --no-run --message-format=json 2>/dev/null \
    | python3 -c "import json, sys; print(*[m['executable'] for m in map(json.loads, sys.stdin) if m.get('reason') == 'compiler-artifact' and m['target']['name'] == 'collectives' and m.get('executable')])")

rm -rf .device
mkdir -p .device/bin .device/shared/models .device/shared/data/hh-rlhf .device/shared/data/oasst .device/shared/data/prompts
for b in "${bins[@]}"; do strip -o ".device/bin/$b" "$CARGO_TARGET_DIR/release/$b"; done
strip -o .device/bin/collectives "$collectives"
python3 - <<'PY'
import tarfile
with tarfile.open(".device/bin.tar.xz", "w:xz") as t:
    t.add(".device/bin", arcname="bin")
PY
rm -r .device/bin
cp -r ../shared/models/stories260K .device/shared/models/
cp ../shared/data/hh-rlhf/helpful-base-test.jsonl.gz .device/shared/data/hh-rlhf/
cp ../shared/data/oasst/en_100_tree.jsonl .device/shared/data/oasst/
cp ../shared/data/prompts/vicuna_bench_question.jsonl .device/shared/data/prompts/
echo "torch $DEVICE_TORCH" > .device/torch-version
size=$(du -sm .device | cut -f1)
echo ".device: ${size} MiB (binaries built against torch $DEVICE_TORCH; at most 64 MiB travel with a call, the working tree included)"
[ "$size" -lt 60 ] || { echo "too large to travel"; exit 1; }
