#!/usr/bin/env bash
# CPU side, once: gather what the lent GPU machine lacks (it has Python 3.12 and torch 2.11 +
# CUDA 13, pytest, no megatron-core / Transformer Engine / DALI / PyAV) and pack it into call-sized
# folders for the device tool, one set per round (docs/gpu.md "Rounds": a lent session has 15
# device minutes and runs one round; every call sends at most 64 MiB, the repository included).
#
#   bash tools/gpu/fetch.sh [DIR]          # DIR defaults to .gpu (git-ignored)
#     -> DIR/wheels/{core,dali,te}/...      the downloads (cp312 manylinux wheels, one sdist)
#     -> DIR/<round>/call-1 ... call-N      each fits one call beside the repository: pieces + MANIFEST
#
# Bundles (the core bundle goes into every round):
#   core: megatron-core (2.5 MB): all that parts (a), (e), (f), (g) and the kernel tests need.
#   dali: DALI for CUDA 13, the Python packages `import nvidia.dali` needs (astunparse, six, gast,
#         makefun, optree, nvtx, libcst; six was missing until tools/gpu/rehearse.sh ran the sequence
#         in a bare environment) and PyAV (the reference decoder of part d). DALI's image-codec
#         libraries (nvimgcodec, nvcomp, nvjpeg*: +64 MB) are not carried: our pipeline decodes only
#         video with DALI (measured on CPU: video decoding works without them). DALI_IMAGE_LIBS=1
#         adds them.
#   te:   Transformer Engine 2.20.2 (meta wheel + the CUDA 13 core library wheel), pydantic (its
#         recipes import it) and the transformer-engine-torch sdist (no binary wheel exists; the
#         extension is built on the machine: tools/gpu/device.sh build-te), with what that build
#         imports or runs and a Python 3.12 environment may lack: setuptools, wheel (TE's setup.py
#         imports wheel.bdist_wheel) and ninja (without it torch compiles the 33 files one by one).
# pytest and its dependencies are on the GPU machines (device tool's KINDS.md) and are not carried.
# PACKAGES_CORE / PACKAGES_DALI / PACKAGES_TE override the lists (the tests use a tiny package);
# PIECE_MIB and BUDGET_MIB the piece and folder sizes (default: what the repository leaves of a
# call's 64 MiB, `python3 tools/gpu/pack.py travel .`); PYTHON_VERSION (default 3.12, the GPU
# machine's) the wheels' Python (tools/gpu/rehearse.sh fetches this machine's 3.11 to rehearse).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-.gpu}
core=${PACKAGES_CORE-"megatron-core==0.16.1"}
dali=${PACKAGES_DALI-"av==18.1.0 nvidia-dali-cuda130==2.4.0 astunparse==1.6.3 six==1.17.0 gast==0.7.0 \
makefun==1.16.0 optree==0.20.0 nvtx==0.2.17 libcst==1.9.0"}
if [ "${DALI_IMAGE_LIBS:-0}" = 1 ]; then
  dali="$dali nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg==13.3.2.43 \
nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82"
fi
te=${PACKAGES_TE-"transformer-engine==2.20.2 transformer-engine-cu13==2.20.2 pydantic==2.14.3 \
pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
setuptools==80.9.0 wheel==0.45.1 ninja==1.13.0"}
te_sdist=${TE_TORCH_SDIST-"transformer-engine-torch 2.20.2"}

download() {  # bundle, packages...
  local out="$dir/wheels/$1"; shift
  rm -rf "$out"
  [ $# -eq 0 ] && return 0
  mkdir -p "$out"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" "$@"
}
start=$(date +%s)
# shellcheck disable=SC2086
download core $core
# shellcheck disable=SC2086
download dali $dali
# shellcheck disable=SC2086
download te $te
if [ -n "$te_sdist" ]; then
  python3 "$here/fetch_sdist.py" $te_sdist "$dir/wheels/te"  # shellcheck disable=SC2086
fi
echo "downloaded in $(( $(date +%s) - start )) s: $(du -sh "$dir/wheels" | cut -f1)"
python3 "$here/pack.py" pack "$dir" ${PIECE_MIB:+--piece-mib "$PIECE_MIB"} ${BUDGET_MIB:+--budget-mib "$BUDGET_MIB"}
