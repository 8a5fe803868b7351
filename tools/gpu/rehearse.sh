#!/usr/bin/env bash
# docs/gpu.md's device sequence rehearsed on this CPU machine, in an environment holding only
# what a lent GPU machine has (../shared/gpu/GPU.md: torch, transformers 5.17, pytest, pyyaml,
# pillow, matplotlib, psutil, tqdm, safetensors, nothing of ours) plus the carried core bundle,
# fetched, cut into call folders, stored call by call and installed exactly as there. A missing
# import, a dependency the bundle lacks or a PYTHONPATH mistake shows up here, not in a session's
# 30 device minutes. What cannot be the same: Python 3.11 and torch 2.13 CPU here (3.12 and torch
# 2.11 + CUDA 13 there), and the te bundle (its torch extension needs CUDA to build).
#
#   bash tools/gpu/rehearse.sh [WORK]     WORK defaults to /tmp/gpu-rehearsal (~1.3 GB, ~5 min)
#
# Ends with the device sequence's outputs under WORK/out (gpu_tests.txt, gpu.md, gpu.json).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-/tmp/gpu-rehearsal}
log() { echo "[rehearse $(date +%H:%M:%S)] $*"; }
rm -rf "$work"
mkdir -p "$work"
cd "$repo"

log "a bare environment with the GPU machine's packages"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -m pip install -q torch==2.13.0 transformers==5.17.0 pytest pyyaml pillow matplotlib psutil tqdm safetensors

log "the core bundle for this machine's Python, cut into call folders as for the GPU machine"
PYTHON_VERSION=$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') \
  PACKAGES_TE="" TE_TORCH_SDIST="" bash tools/gpu/fetch.sh "$work/calls"

export GPU_STORE="$work/store" GPU_SITE="$work/site" GPU_CALLS="$work/calls" OUT="$work/out"
for call in "$work"/calls/call-*; do
  bash tools/gpu/device.sh store "${call##*-}"
done
bash tools/gpu/device.sh install core
bash tools/gpu/device.sh probe
log "call 4's tests (GPU-only tests skip here, each with its reason)"
bash tools/gpu/device.sh tests
log "call 5's check, then the GPU parts' code on the CPU (--rehearse-cpu) through the same results store"
bash tools/gpu/device.sh check --parts ad
bash tools/gpu/device.sh check --parts cefg --rehearse-cpu --quick
log "the streaming benchmark's calls (issue 11), one fusion set per call, through its results store"
bash tools/gpu/device.sh stream --preset cpu_tiny --frames 24 --tokens 2 --fusions casa,text_only --budget-s 30
bash tools/gpu/device.sh stream --preset cpu_tiny --frames 24 --tokens 2 --fusions insertion --budget-s 30
log "done: $OUT"
ls -l "$OUT"
