#!/usr/bin/env bash
# One node or many: torchrun around casa-train. Rendezvous comes from the environment.
#   NPROC_PER_NODE=8 bash launch/torchrun.sh configs/tiny_cpu_synthetic.yaml parallel.tensor_model_parallel_size=2
# Many nodes: also set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (SLURM script: planned).
set -euo pipefail
# On Ctrl-C / SIGTERM torchrun forwards the signal to the workers, which finish the step and
# write a checkpoint -- but it SIGKILLs them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by
# default), which a large model's checkpoint can exceed. Give them 10 minutes.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
exec torchrun \
  --nproc_per_node="${NPROC_PER_NODE:-1}" \
  --nnodes="${NNODES:-1}" \
  --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${MASTER_PORT:-29500}" \
  -m casa_megatron.train "$@"
