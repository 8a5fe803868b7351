#!/usr/bin/env bash
# GPU-machine side of tools/gpu (docs/gpu.md "Rounds"; tools/gpu/round.sh runs a round's last
# call with these verbs under a time budget). Run from the repo root:
#   bash tools/gpu/device.sh store R K      copy .gpu/R/call-K (carried by this call) to the store
#   bash tools/gpu/device.sh install B      join + sha256-check the pieces of bundles B (e.g.
#                                           core,dali), pip-install the wheels into the site folder
#                                           (no network, no deps)
#   bash tools/gpu/device.sh build-te       build the Transformer Engine torch extension (sm_90)
#   bash tools/gpu/device.sh te-imports     exit 0 if transformer_engine.pytorch imports (prebuilt
#                                           extension carried: tools/gpu/prebuild_te.sh)
#   bash tools/gpu/device.sh probe          versions + what imports: answers GPU.md's questions
#   bash tools/gpu/device.sh tests [PATHS]  the GPU-only tests (kernels, remote-code attention, DALI
#                                           GPU decoder) -> $OUT/gpu_tests.txt
#   bash tools/gpu/device.sh check [ARGS]   benchmarks/gpu_check.py -> $OUT/gpu.md, $OUT/gpu.json (with
#                                           the parts earlier check calls on this machine measured)
#   bash tools/gpu/device.sh stream [ARGS]  benchmarks/streaming.py -> $OUT/streaming.{json,png} (with
#                                           the fusions earlier stream calls on this machine ran)
# GPU_STORE (default /root/gpu-store) and GPU_SITE (default /root/gpu-site) live outside the
# repository, so they survive from call to call while the machine stays warm (30 s after a call).
# GPU_CALLS (default .gpu) is where the carried call folders are.
set -euo pipefail
store=${GPU_STORE:-/root/gpu-store}; site=${GPU_SITE:-/root/gpu-site}; out=${OUT:-/tmp/gpu-out}
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../.." && pwd); calls=${GPU_CALLS:-$repo/.gpu}
mkdir -p "$store" "$site" "$out"
log() { echo "[device.sh $(date +%H:%M:%S)] $*"; }

case "${1:-}" in
  store)
    round=${2:?usage: device.sh store ROUND K}; k=${3:?usage: device.sh store ROUND K}
    folder="$calls/$round/call-$k"
    [ -d "$folder" ] || { echo "no $folder here: name .gpu/$round/call-$k in the call's carry"; exit 2; }
    cp "$folder"/* "$store/"
    log "$round/call-$k stored: $(ls "$store" | grep -c piece) pieces in $store ($(du -sh "$store" | cut -f1))" ;;
  install)
    bundles=${2:?usage: device.sh install BUNDLES (e.g. core,dali)}
    start=$(date +%s)
    whole="$store/whole/${bundles//,/_}"  # this install's files only (core may be installed before te)
    python3 "$here/pack.py" join "$store" "$whole" --bundles "$bundles"
    wheels=$(ls "$whole"/*.whl)
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $wheels
    log "installed into $site in $(( $(date +%s) - start )) s: $(ls "$whole" | tr '\n' ' ')" ;;
  build-te)
    sdist=$(ls "$store"/whole/*/transformer_engine_torch-*.tar.gz 2>/dev/null | head -1)
    [ -n "$sdist" ] || { echo "no transformer_engine_torch sdist under $store/whole: install the te bundle first"; exit 2; }
    start=$(date +%s)
    # The extension is C++ (a torch CppExtension) that includes CUDA runtime, cuDNN, NCCL and NVRTC
    # headers. TE takes "<nvcc's parent>/../include" as the toolkit's: wrong for a wrapper script
    # such as /usr/local/bin/nvcc (seen on the CPU machines), and a toolkit from the CUDA installer
    # has no cuDNN / NCCL headers anyway: those come with the pip wheels (nvidia/<lib>/include,
    # nvidia/cu13/include). So: the toolkit include directory that really holds cuda_runtime.h
    # (CUDA_HOME, /usr/local/cuda, /usr/local/cuda-*), then every pip one (DALI's excluded), on CPATH.
    cpath=$(python3 -c 'import glob, os, sys
homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
toolkit = [os.path.join(h, "include") for h in homes if h and os.path.isfile(os.path.join(h, "include", "cuda_runtime.h"))]
wheels = [d for p in sys.path for d in sorted(glob.glob(os.path.join(p, "nvidia", "*", "include")))
          if os.sep + "dali" + os.sep not in d]
print(":".join(toolkit[:1] + wheels))')
    log "include directories on CPATH: ${cpath:-none}"
    if [ -z "${CUDA_HOME:-}" ] && [ -n "$cpath" ] && [ -f "${cpath%%:*}/cuda_runtime.h" ]; then
      export CUDA_HOME=$(dirname "${cpath%%:*}")  # TE reads the CUDA version from $CUDA_HOME/bin/nvcc
    fi
    # No network there: force the local build (it would try to download a prebuilt wheel first).
    # NCCL EP (expert parallelism) is not used here: leaving it out drops its headers and sources.
    # setuptools / wheel / ninja come from the te bundle in $site (PATH: ninja's script).
    # Built into its own folder, then merged: `pip install --target --upgrade` replaces a
    # top-level directory that exists, and the extension's wheel has transformer_engine/wheel_lib/,
    # which would delete the whole transformer_engine package the te bundle installed.
    # TE_WHEEL_DIR (tools/gpu/prebuild_te.sh, on the CPU machine): build a wheel to carry, and stop.
    built="$store/te_torch_build"
    rm -rf "$built"
    if [ -n "${TE_WHEEL_DIR:-}" ]; then mode=(wheel -w "$TE_WHEEL_DIR"); else mode=(install --target "$built"); fi
    CPATH="$cpath${CPATH:+:$CPATH}" NVTE_WITH_NCCL_EP=${NVTE_WITH_NCCL_EP:-0} PATH="$site/bin:$PATH" \
    NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS:-90} \
      MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH="$site" \
      python3 -m pip "${mode[@]}" --no-build-isolation --no-deps --no-index --no-cache-dir \
      "$sdist" > "$out/te_build.log" 2>&1 || { tail -40 "$out/te_build.log"; exit 1; }
    if [ -n "${TE_WHEEL_DIR:-}" ]; then
      log "TE torch extension wheel built in $(( $(date +%s) - start )) s: $(ls "$TE_WHEEL_DIR")"
      exit 0
    fi
    cp -a "$built"/. "$site"/  # adds transformer_engine/wheel_lib/transformer_engine_torch*.so + dist-info
    log "TE torch extension built in $(( $(date +%s) - start )) s: $(cd "$site" && ls transformer_engine/wheel_lib/ \
      | grep transformer_engine_torch) (log: \$OUT/te_build.log)" ;;
  te-imports)  # exit 0 when transformer_engine.pytorch imports (its torch extension carried prebuilt).
    # torch first, as our code does: TE's core library needs libnccl.so.2, which a pip-installed
    # CUDA torch loads from its nvidia-nccl wheel; imported alone, TE does not find it (seen with
    # torch 2.11.0+cu130 on the CPU machine: "libnccl.so.2: cannot open shared object file").
    PYTHONPATH="$site:$repo" python3 -c "import torch, transformer_engine.pytorch as te, transformer_engine_torch as tex
print('transformer_engine.pytorch', te.__file__, 'extension', tex.__file__)" ;;
  probe)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    PYTHONPATH="$site:$repo" python3 - <<'PY'
import importlib, inspect, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("megatron.core", "transformer_engine.pytorch", "flash_attn", "nvidia.dali", "av",
             "torch.nn.attention.varlen"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: ok {getattr(mod, '__version__', '')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: FAILED {type(exc).__name__}: {exc}"[:300])
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn signature:", inspect.signature(varlen_attn))
except Exception as exc:  # noqa: BLE001
    print("varlen_attn: none", exc)
PY
    ;;
  tests)
    shift
    cd "$repo"
    [ $# -gt 0 ] || set -- tests/model/test_window_kernels.py tests/model/test_kernel_glue.py \
      tests/hf/test_attention_kernels.py tests/data/test_dali_decoder.py
    set +e
    PYTHONPATH="$site:$repo" python3 -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$out/gpu_tests.txt"
    rc=${PIPESTATUS[0]}
    set -e
    exit "$rc" ;;
  check)
    shift
    cd "$repo"
    cp docs/gpu.md "$out/gpu.md"  # the guide with its report markers: the report lands between them
    # the results store keeps the parts of earlier check calls on this machine and, seeded from the
    # committed benchmarks/results/gpu_check.json, those of earlier rounds (other sessions): every
    # round's report holds every part measured so far. Report and JSON are rewritten after every
    # part, so a call cut at its limit still returns them.
    seed=benchmarks/results/gpu_check.json
    [ -f "$store/gpu_check.json" ] || [ ! -f "$seed" ] || cp "$seed" "$store/gpu_check.json"
    PYTHONPATH="$site:$repo" PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py \
      --out "$out/gpu.md" --json "$out/gpu.json" --results-store "$store/gpu_check.json" "$@" ;;
  stream)
    shift
    cd "$repo"
    # issue 11's streaming benchmark (benchmarks/streaming.py); fusions may go in separate calls,
    # carried into one report by the results store (seeded, like check's, from the committed
    # results of earlier rounds); the JSON is rewritten after every fusion
    seed=benchmarks/results/streaming_helium2b_gpu.json
    case " $* " in *" --preset helium2b_gpu "*)
      [ -f "$store/streaming.json" ] || [ ! -f "$seed" ] || cp "$seed" "$store/streaming.json" ;; esac
    PYTHONPATH="$site:$repo" PYTHONUNBUFFERED=1 python3 benchmarks/streaming.py --json "$out/streaming.json" \
      --results-store "$store/streaming.json" "$@" ;;
  *) sed -n 2,20p "$0"; exit 2 ;;
esac
