#!/usr/bin/env bash
# The last device call of a round (docs/gpu.md "Rounds"): a lent session has 15 device minutes,
# the machine's start included, so each round is one prepared command that stores the call's
# folder, installs the round's bundles and measures in order of value, every step under what is
# left of BUDGET_S seconds (a step that no longer fits is skipped and said so; a step that hangs
# is stopped at the budget). Run from the repo root, with .gpu/ROUND/call-K carried:
#
#   bash tools/gpu/round.sh core 1 420    # (a) kernels, (e) paper-shape CASA vs insertion, (f) MFU,
#                                         # (g) the training loop + background saves, kernel tests, an
#                                         # exported folder generating in bf16 on CUDA
#   bash tools/gpu/round.sh stream 0 480  # issue 11: helium2b_gpu streaming, CASA / text-only / insertion
#   bash tools/gpu/round.sh dali 4 300    # after `device.sh store dali 1..3`: (d) DALI vs PyAV, DALI tests
#   bash tools/gpu/round.sh te 5 420      # after `device.sh store te 1..4`: TE (its torch extension
#                                         # prebuilt here, else built there), (b), (c), TE rows of (a)
#                                         # and (f), the TE kernel test
#
# Writes $OUT/round.log (every step, its exit status and seconds, then the report's targets) beside
# what the steps write ($OUT/gpu.md, gpu.json, gpu_tests.txt, streaming.json/.png, te_build.log).
# K = 0: nothing carried (the stream round needs no package). Give the device call a timeout_s
# about 60 s over BUDGET_S. tools/gpu/rehearse.sh runs the rounds on the CPU with
# GPU_CHECK_EXTRA="--rehearse-cpu --quick" and STREAM_ARGS="--preset cpu_tiny ..." (a rehearsal
# measures nothing about a GPU). ROUND_PARTS replaces the round's gpu_check parts (a second try of
# one part in a fresh machine: ROUND_PARTS=e bash tools/gpu/round.sh core 1 240).
set -uo pipefail
round=${1:?usage: round.sh core|stream|dali|te K [BUDGET_S]}; k=${2:?usage: round.sh ROUND K [BUDGET_S]}
budget=${3:-420}
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
dev=(bash "${DEVICE_SH:-tools/gpu/device.sh}")  # DEVICE_SH: a stand-in in tests/tools/test_gpu_pack.py
deadline=$((SECONDS + budget))
summary=()
log() { echo "[round $round $(date +%H:%M:%S), $((deadline - SECONDS)) s left] $*"; }

left() { echo $((deadline - SECONDS)); }

# step NAME NEED_S COMMAND...: run COMMAND if NEED_S seconds are left, stopped at the deadline.
step() {
  local name=$1 need=$2 t0=$SECONDS rc
  shift 2
  if [ "$(left)" -lt "$need" ]; then
    log "$name: skipped ($(left) s left, needs about $need s)"
    summary+=("$name: skipped")
    return 0
  fi
  log "$name: $*"
  timeout -k 5 "$(left)" "$@"
  rc=$?
  [ "$rc" -eq 124 ] && log "$name: stopped at the budget"
  log "$name: exit $rc in $((SECONDS - t0)) s"
  summary+=("$name: exit $rc, $((SECONDS - t0)) s")
  return 0
}

# required NAME COMMAND...: a step the rest depends on (store, install): stop the round if it fails.
required() {
  local name=$1
  step "$@"
  case "${summary[-1]}" in *"exit 0"*) ;; *) log "$name failed: the round stops"; finish; exit 1 ;; esac
}

finish() {  # the end of the output is what the device tool's reply shows: the results, briefly
  log "summary"
  printf '  %s\n' "${summary[@]}"
  python3 - "$out" <<'PY' || true
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
if (out / "gpu.json").exists():
    for p in json.loads((out / "gpu.json").read_text())["parts"]:
        print(f"  ({p['part']}) {p['status']} {p['seconds']:.0f} s {p['reason'][:150]}")
        for name, t in p.get("targets", {}).items():
            print(f"      {name}: {t['value']} (goal {t['target']}, met {t['met']})")
if (out / "streaming.json").exists():
    print(json.loads((out / "streaming.json").read_text())["table"])
PY
  ls -l "$out"
}

main() {
  log "budget ${budget} s"
  [ "$k" = 0 ] || required store 5 "${dev[@]}" store "$round" "$k"
  case "$round" in
    core)
      required install 10 "${dev[@]}" install core
      step probe 10 "${dev[@]}" probe
      # the kernel tests (~20 s) after the check: keep 40 s for them
      step check 60 "${dev[@]}" check --parts "${ROUND_PARTS:-aefg}" --budget-s $(( $(left) - 40 )) ${GPU_CHECK_EXTRA:-}
      step tests 20 "${dev[@]}" tests tests/model/test_window_kernels.py tests/model/test_kernel_glue.py \
        tests/hf/test_attention_kernels.py tests/hf/test_device_load.py ;;
    stream)
      step probe 10 "${dev[@]}" probe
      # shellcheck disable=SC2086
      step stream 120 "${dev[@]}" stream ${STREAM_ARGS:---preset helium2b_gpu} --total-budget-s $(( $(left) - 30 )) ;;
    dali)
      required install 15 "${dev[@]}" install core,dali
      step probe 10 "${dev[@]}" probe
      step check 30 "${dev[@]}" check --parts "${ROUND_PARTS:-d}" --budget-s $(( $(left) - 40 )) ${GPU_CHECK_EXTRA:-}
      step tests 20 "${dev[@]}" tests tests/data/test_dali_decoder.py tests/data/test_video_decoding.py ;;
    te)
      required install 20 "${dev[@]}" install core,te
      # the extension prebuilt on the CPU machine (tools/gpu/prebuild_te.sh) if it loads, else built here
      step te-imports 10 "${dev[@]}" te-imports
      case "${summary[-1]}" in *"exit 0"*) ;; *) required build-te 60 "${dev[@]}" build-te ;; esac
      step probe 10 "${dev[@]}" probe
      step check 60 "${dev[@]}" check --parts "${ROUND_PARTS:-bcaf}" --budget-s $(( $(left) - 30 )) ${GPU_CHECK_EXTRA:-}
      step tests 20 "${dev[@]}" tests tests/model/test_window_kernels.py ;;
    *) echo "unknown round $round: core, stream, dali or te" >&2; exit 2 ;;
  esac
  finish
}

main 2>&1 | tee -a "$out/round.log"
exit "${PIPESTATUS[0]}"
