#!/usr/bin/env bash
# docs/gpu.md's rounds rehearsed on this CPU machine, each in a fresh "machine" (its own store,
# site folder and $OUT), in an environment holding only what a lent GPU machine has
# (../shared/gpu/GPU.md and the device tool's KINDS.md: torch, transformers 5.17, pytest, pyyaml,
# pillow, matplotlib, psutil, tqdm, safetensors, six; nothing of ours) plus the carried bundles,
# fetched, cut into call folders, stored call by call and installed exactly as there, then
# `tools/gpu/round.sh` with the GPU parts' code run on the CPU (--rehearse-cpu). A missing import,
# a dependency a bundle lacks, a PYTHONPATH mistake or a step that overruns its budget shows up
# here, not in a session's 15 device minutes. PYTHON and TORCH_SPEC give the lent machines' Python
# 3.12 and torch 2.11 + CUDA 13 (run on the CPU); what cannot be the same is the GPU itself, and the
# te round (its torch extension needs CUDA to build; tools/gpu/rehearse_te_build.sh rehearses it).
#
#   bash tools/gpu/rehearse.sh [WORK]     WORK defaults to /tmp/gpu-rehearsal (~1.3 GB, ~3 min)
#   TORCH_SPEC=torch==2.11.0 bash tools/gpu/rehearse.sh   # the lent machines' torch: PyPI's CUDA 13
#                                         # build and its CUDA libraries (~3 GB more); runs on the CPU
#   PYTHON=/root/.pyenv/versions/3.12.1/bin/python3 TORCH_SPEC=torch==2.11.0 bash tools/gpu/rehearse.sh
#                                         # and their Python 3.12 (cp312 wheels, as carried there)
#
# Ends with each round's outputs under WORK/<round>/out (round.log, gpu.md, gpu.json, ...).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-/tmp/gpu-rehearsal}
log() { echo "[rehearse $(date +%H:%M:%S)] $*"; }
rm -rf "$work"
mkdir -p "$work"
cd "$repo"

log "a bare environment with the GPU machine's packages"
"${PYTHON:-python3}" -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" transformers==5.17.0 pytest pyyaml pillow matplotlib psutil tqdm \
  safetensors six
python -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__,
                                                "transformers", transformers.__version__)'

log "the core and dali bundles for this machine's Python, cut into call folders as for the GPU machine"
PYTHON_VERSION=$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') \
  PACKAGES_TE="" TE_TORCH_SDIST="" bash tools/gpu/fetch.sh "$work/calls"

machine() {  # a fresh lent machine for one round
  export GPU_STORE="$work/$1/store" GPU_SITE="$work/$1/site" GPU_CALLS="$work/calls" OUT="$work/$1/out"
}
export GPU_CHECK_EXTRA="--rehearse-cpu --quick"
log "round core: one call"
machine core
bash tools/gpu/round.sh core 1 420
log "round stream: one call, nothing carried (cpu_tiny instead of helium2b_gpu)"
machine stream
STREAM_ARGS="--preset cpu_tiny --frames 24 --tokens 2" bash tools/gpu/round.sh stream 0 150
log "round dali: its calls store, the last one measures"
machine dali
calls=$(ls -d "$work"/calls/dali/call-* | wc -l)
for k in $(seq 1 $((calls - 1))); do
  bash tools/gpu/device.sh store dali "$k"
done
bash tools/gpu/round.sh dali "$calls" 300
log "done: $work/{core,stream,dali}/out"
ls -l "$work"/*/out
