#!/usr/bin/env bash
# Set-up and the two front-door jobs, on a fresh machine:
#   bash dev.sh train   -> install, then the tiny CASA pretraining run (CPU, generated data, MLflow)
#   bash dev.sh test    -> install, then the test suite
# VENV=path chooses the virtual environment (default .venv next to this file).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The CPU wheel of torch 2.13.0 is pinned here: an unpinned torch pulls GBs of CUDA packages.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
case "${1:-}" in
  train) shift
         # The generated dataset (images, H.264 clips, two-image samples, tokenizer, shards, a
         # held-out split): made once per generator version, ~6-10 s.
         python tools/make_synthetic_data.py --out data/synthetic --if-stale
         # Validation on the generated held-out split: given here, not in the YAML, so that the
         # YAML stays valid with any data.source=... override. Every 100 steps the model also
         # answers the whole held-out split by generation (eval_generation, docs/evaluation.md).
         casa-train configs/tiny_cpu.yaml "data.valid=[{path: data/synthetic/valid}]" eval_interval=50 eval_iters=2 \
           eval_generation.data=data/synthetic/valid eval_generation.interval=100 eval_generation.max_samples=null \
           "$@" ;;
  test)  shift; python -m pytest tests -q "$@" ;;
  *) echo "usage: bash dev.sh train|test [args]" >&2; exit 2 ;;
esac
