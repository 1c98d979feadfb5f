#!/usr/bin/env bash
# One node, N processes (one per GPU), DeepSpeed launcher.
#   NPROC=8 bash launch/deepspeed_single_node.sh CONFIG.yaml [key=value ...]
set -euo pipefail
CONFIG="$1"; shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --module mgpt4_dist.train --config "$CONFIG" "$@"
