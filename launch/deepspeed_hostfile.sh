#!/usr/bin/env bash
# Several nodes from a DeepSpeed hostfile ("host slots=N" per line).
#   bash launch/deepspeed_hostfile.sh HOSTFILE CONFIG.yaml [key=value ...]
# With passwordless ssh/pdsh, run it once on the first host: the launcher starts every node.
# Without ssh, run it on every node with NODE_RANK set (0 on the first host): each node starts its
# own processes (DeepSpeed's --no_ssh mode). A one-host file needs neither ssh nor NODE_RANK.
set -euo pipefail
HOSTFILE="$1"; CONFIG="$2"; shift 2
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
HOSTS=$(awk 'NF && $1 !~ /^#/' "$HOSTFILE" | wc -l)
NO_SSH=()
if [ -n "${NODE_RANK:-}" ] || [ "$HOSTS" -eq 1 ]; then
  NO_SSH=(--no_ssh --node_rank "${NODE_RANK:-0}")
fi
exec deepspeed --hostfile "$HOSTFILE" "${NO_SSH[@]}" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" --module mgpt4_dist.train --config "$CONFIG" "$@"
