#!/usr/bin/env bash
# torchrun on one node, or on node NODE_RANK of NNODES (run it on every node with the same MASTER_ADDR).
#   NPROC=8 bash launch/torchrun.sh CONFIG.yaml [key=value ...]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 NPROC=8 bash launch/torchrun.sh CONFIG.yaml ...
# MGPT4_MAX_RESTARTS=N: a rank that dies makes torchrun restart them all, up to N times; they resume
# from RUN_DIR/checkpoints/latest. Default 0: torchrun restarts on any non-zero exit, a user error (2)
# or a preemption (75) included, which slurm/job.sh tells apart.
set -euo pipefail
CONFIG="$1"; shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
exec torchrun --nproc-per-node "$NPROC" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  --max-restarts "${MGPT4_MAX_RESTARTS:-0}" \
  -m mgpt4_dist.train --config "$CONFIG" "$@"
