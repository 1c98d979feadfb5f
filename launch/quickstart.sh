#!/usr/bin/env bash
# A real stage-1 run on a tiny built-in model and generated shards, 2 processes with DeepSpeed
# ZeRO-2 (CPU is enough). Everything goes under runs/quickstart/.
#   bash launch/quickstart.sh [key=value overrides...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
OUT="${MGPT4_QUICKSTART_DIR:-$REPO_ROOT/runs/quickstart}"
NPROC="${NPROC:-2}"
START=$(date +%s)

echo "[quickstart] building the tiny model and synthetic shards in $OUT/assets"
ASSET_LOG=$(mgpt4-make-tiny-assets --out "$OUT/assets")
echo "$ASSET_LOG" | grep -v '^overrides:' || true
read -r -a OVERRIDES <<< "$(echo "$ASSET_LOG" | sed -n 's/^overrides: //p')"

RUN="$OUT/run"
rm -rf "$RUN"  # a fresh run each time; the assets above are reused
echo "[quickstart] training stage 1 on $NPROC processes with DeepSpeed ZeRO-2 -> $RUN"
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
deepspeed --num_gpus "$NPROC" --master_port "$PORT" --module mgpt4_dist.train \
  --config mgpt4_dist/configs/tiny_stage1.yaml run_dir="$RUN" "${OVERRIDES[@]}" "$@"

# Held-out scenes (a seed the assets never use): captions with the projection at init and trained.
HELDOUT="$OUT/heldout"
rm -rf "$HELDOUT"
mgpt4-make-shards --synthetic 128 --seed 777 --out "$HELDOUT" --samples-per-shard 128 > /dev/null
echo "[quickstart] what the run learnt, on 128 held-out scenes:"
python -m mgpt4_dist.tiny.probe "$RUN" --shards "$HELDOUT/*.tar" --max-samples 128 --out "$RUN/learning_probe.json"

echo "[quickstart] finished in $(( $(date +%s) - START )) s"
echo "[quickstart]   metrics:     $RUN/metrics.jsonl"
echo "[quickstart]   TensorBoard: $RUN/tb   (tensorboard --logdir $RUN/tb)"
echo "[quickstart]   checkpoint:  $RUN/checkpoints/$(cat "$RUN/checkpoints/latest")"
