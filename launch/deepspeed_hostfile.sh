#!/usr/bin/env bash
# Several nodes from a DeepSpeed hostfile ("host slots=N" per line).
#   bash launch/deepspeed_hostfile.sh HOSTFILE CONFIG.yaml [key=value ...]
# With passwordless ssh/pdsh, run it once on the first host: the launcher starts every node.
# Without ssh, run it on every node with NODE_RANK set (0 on the first host, or the node's own name
# as the hostfile spells it): each node starts its own processes (DeepSpeed's --no_ssh mode).
# slurm/stage1_deepspeed.sbatch runs it that way. A one-host file needs neither ssh nor NODE_RANK.
set -euo pipefail
HOSTFILE="$1"; CONFIG="$2"; shift 2
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
HOSTS=$(awk 'NF && $1 !~ /^#/' "$HOSTFILE" | wc -l)
if [ -n "${NODE_RANK:-}" ] && ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]]; then
  NAME=$NODE_RANK
  NODE_RANK=$(awk -v h="$NAME" 'NF && $1 !~ /^#/ {if ($1 == h) {print n + 0; exit}; n++}' "$HOSTFILE")
  [ -n "$NODE_RANK" ] || { echo "NODE_RANK=$NAME: no such host in $HOSTFILE (use its line number from 0, or a name listed there)" >&2; exit 2; }
fi
NO_SSH=()
if [ -n "${NODE_RANK:-}" ] || [ "$HOSTS" -eq 1 ]; then
  NO_SSH=(--no_ssh --node_rank "${NODE_RANK:-0}")
fi
exec deepspeed --hostfile "$HOSTFILE" "${NO_SSH[@]}" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" --module mgpt4_dist.train --config "$CONFIG" "$@"
