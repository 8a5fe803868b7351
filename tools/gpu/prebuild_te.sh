#!/usr/bin/env bash
# Build the Transformer Engine torch extension HERE, on the CPU machine, for the lent GPU machines'
# exact stack -- Python 3.12, torch 2.11.0+cu130 (PyPI's CUDA build and its CUDA wheels, headers
# included), TE 2.20.2, the CUDA 13.0 toolkit -- as a wheel the te round carries and installs with
# the rest of its bundle, instead of compiling it there (1-2 of a session's 15 device minutes, and
# the round's riskiest step). The extension is C++ only (a torch CppExtension, 33 files): it needs
# the CUDA headers and nvcc's version, not a GPU. The te round still carries the sdist and builds
# from it when the prebuilt extension does not import there (`device.sh te-imports`).
#
#   bash tools/gpu/fetch.sh .gpu && bash tools/gpu/prebuild_te.sh [.gpu] [JOBS]   # JOBS: 2 (~8 min here)
#
# Needs pyenv's Python 3.12 (PYTHON=..., default /root/.pyenv/versions/3.12.1/bin/python3) and a
# CUDA 13 toolkit (nvcc, cuda_runtime.h). Writes DIR/wheels/te/transformer_engine_torch-*-cp312-*.whl
# and re-packs the rounds (the te round's calls change). The build runs `device.sh build-te` itself
# (TE_WHEEL_DIR set), so the CPU machine and the GPU machine build the same way.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
dir=$(cd "${1:-.gpu}" && pwd)
jobs=${2:-2}
python=${PYTHON:-/root/.pyenv/versions/3.12.1/bin/python3}
work=${TE_PREBUILD_WORK:-/tmp/te-prebuild}
log() { echo "[prebuild-te $(date +%H:%M:%S)] $*"; }
sdist=$(ls "$dir"/wheels/te/transformer_engine_torch-*.tar.gz 2>/dev/null | head -1)
[ -n "$sdist" ] || { echo "no transformer_engine_torch sdist in $dir/wheels/te: run tools/gpu/fetch.sh first"; exit 2; }
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
  || { echo "$python is not a Python 3.12 (the GPU machines'): set PYTHON"; exit 2; }
start=$(date +%s)
rm -rf "$work"
mkdir -p "$work"/{store/whole/te,site,out,wheel}

log "a Python 3.12 venv with the GPU machines' torch 2.11.0+cu130 (and its CUDA wheels' headers)"
"$python" -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -m pip install -q torch==2.11.0 packaging
python -c 'import torch; assert torch.version.cuda.startswith("13"), torch.version.cuda; print("torch", torch.__version__)'

log "the te bundle as device.sh install leaves it: its wheels in a site folder, the sdist in the store"
python -m pip install -q --no-index --no-deps --no-compile --target "$work/site" \
  $(ls "$dir"/wheels/te/*.whl | grep -v 'transformer_engine_torch-')
cp "$sdist" "$work/store/whole/te/"

log "device.sh build-te with MAX_JOBS=$jobs, into a wheel"
rm -f "$dir"/wheels/te/transformer_engine_torch-*.whl
cd "$repo"
GPU_STORE="$work/store" GPU_SITE="$work/site" OUT="$work/out" MAX_JOBS="$jobs" TE_WHEEL_DIR="$work/wheel" \
  bash tools/gpu/device.sh build-te
wheel=$(ls "$work"/wheel/transformer_engine_torch-*.whl)
case "$wheel" in *cp312*) ;; *) echo "built $wheel, not a cp312 wheel"; exit 1 ;; esac

log "the wheel installs next to the core library and keeps it (one pip call, as device.sh install does)"
python -m pip install -q --no-index --no-deps --no-compile --target "$work/check" \
  $(ls "$dir"/wheels/te/*.whl) "$wheel"
test -f "$work/check/transformer_engine/wheel_lib/libtransformer_engine.so" || { echo "core library gone"; exit 1; }
ls "$work"/check/transformer_engine/wheel_lib/transformer_engine_torch*.so
# no GPU is needed to load it; numpy, einops, onnx and onnxscript (on the GPU machines) are imported by
# transformer_engine.pytorch
log "the extension loads against torch 2.11 and the TE core library"
python -m pip install -q numpy einops onnx onnxscript
GPU_SITE="$work/check" bash tools/gpu/device.sh te-imports

log "megatron-core's TE wrappers, our TE layer specs and the FP8 recipe against this TE (TE's modules"
log "need CUDA to be instantiated: that is the te round's part b)"
python -m pip install -q --no-deps "$dir"/wheels/core/megatron_core-*.whl pyyaml
PYTHONPATH="$work/check:$repo" python - <<'PY'
import torch  # noqa: F401  (first: it loads the NCCL that TE's core library needs)
import megatron.core.extensions.transformer_engine  # noqa: F401  (megatron-core 0.16.1's TE wrappers)

import dataclasses

from megatron.core.fp8_utils import get_fp8_recipe

from casa_megatron.config.schema import FusionConfig, ModelConfig, ParallelConfig
from casa_megatron.model import specs
from casa_megatron.model.transformer_config import lm_transformer_config

layers = specs.lm_layer_specs(4, FusionConfig(every_n=2), use_te=True)
specs.vision_layer_spec(True)
specs.final_norm_spec(True)
print("TE specs assembled:", [s.module.__name__ for s in layers])
config = dataclasses.replace(lm_transformer_config(ModelConfig(), ParallelConfig(), torch.bfloat16),
                             fp8="hybrid", fp8_recipe="delayed")  # as model/build.py sets precision.fp8
print("FP8 recipe (part c):", get_fp8_recipe(config))
PY
cp "$wheel" "$dir/wheels/te/"
log "built in $(( $(date +%s) - start )) s: $(basename "$wheel") ($(du -h "$wheel" | cut -f1)); re-packing the rounds"
python3 "$repo/tools/gpu/pack.py" pack "$dir"
