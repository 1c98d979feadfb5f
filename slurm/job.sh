#!/usr/bin/env bash
# The body of slurm/stage1.sbatch, stage2.sbatch and stage1_deepspeed.sbatch (they `source` it from
# the batch shell, so the signal trap below belongs to the process Slurm signals).
# Arguments: CONFIG [key=value ...]. MGPT4_LAUNCHER=srun (default: one srun task per rank) or
# deepspeed (one srun task per node running the DeepSpeed launcher from a generated hostfile).
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch [--nodes N ...] $0 CONFIG.yaml [key=value ...]" >&2; exit 2
fi
CONFIG=$1; shift

# Slurm exports the submitting shell's environment (PATH with its venv included); MGPT4_ENV names
# another venv or conda env to activate on the nodes instead.
if [ -n "${MGPT4_ENV:-}" ]; then
  if [ -f "$MGPT4_ENV/bin/activate" ]; then source "$MGPT4_ENV/bin/activate"
  else eval "$(conda shell.bash hook)" && conda activate "$MGPT4_ENV"; fi
fi
command -v python >/dev/null || { echo "no python on PATH: submit from an activated env or set MGPT4_ENV" >&2; exit 2; }

# Resolve the config once here: the run dir (for the job log) and the last step (to tell a finished
# run from a preempted one). A bad config or override fails now, before any node starts.
read -r RUN_DIR LAST_STEP < <(python - "$CONFIG" "$@" <<'PY'
import sys
from mgpt4_dist.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
print(cfg.run_dir, min(cfg.train.stop_at_step or cfg.train.max_steps, cfg.train.max_steps))
PY
) || { echo "config error (see above): fix the config or overrides" >&2; exit 2; }
[ -n "${RUN_DIR:-}" ] || exit 2

# #SBATCH --output cannot name the run dir, so the job log is copied there (appended across requeues).
mkdir -p "$RUN_DIR/slurm"
exec > >(tee -a "$RUN_DIR/slurm/job_${SLURM_JOB_ID}.out") 2>&1

# One task per GPU; on CPU one per node unless MGPT4_TASKS_PER_NODE says otherwise.
# SLURM_GPUS_PER_NODE may carry a type ("a100:8").
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-}
TASKS_PER_NODE=${MGPT4_TASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE##*:}}}
TASKS_PER_NODE=${TASKS_PER_NODE:-1}
NODES=${SLURM_JOB_NUM_NODES:-1}
# Rendezvous on the first node's address (NodeAddr: node names need not resolve), on a port
# derived from the job id so jobs sharing a node do not collide (dist.slurm_master_port agrees).
FIRST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$FIRST" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
[ -n "${MGPT4_NCCL_ENV:-}" ] && source "$MGPT4_NCCL_ENV"   # e.g. slurm/env/nccl_ib.sh
# Crash restarts (a rank died, a node was lost, a collective failed) are counted here, apart from
# preemption requeues (unlimited): after MGPT4_MAX_RESTARTS of them the job ends FAILED. Per job id,
# so a new submission to the same run dir starts with the full allowance.
MAX_RESTARTS=${MGPT4_MAX_RESTARTS:-3}
CRASH_FILE="$RUN_DIR/slurm/crash_restarts_${SLURM_JOB_ID}"
CRASHES=$(cat "$CRASH_FILE" 2>/dev/null || echo 0)
echo "[job] $(date -u +%FT%TZ) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} (crash restarts $CRASHES/$MAX_RESTARTS): $NODES node(s) x $TASKS_PER_NODE task(s) (${MGPT4_LAUNCHER:-srun} launch), master $MASTER_ADDR:$MASTER_PORT, run_dir $RUN_DIR"

# Preemption. The batch shell receives USR1 120 s before the time limit (--signal=B:USR1@120), from
# `scancel --signal=USR1 --batch|--full JOBID`, or TERM on preemption; it passes the signal on to the
# training step's tasks (`scancel` without --batch signals every step but the batch shell's own:
# not srun, which answers TERM by cancelling the step). Slurm delivers it to every process of the
# step: the ranks finish their step, agree, write a checkpoint and exit 75 (EXIT_PREEMPTED); their
# DataLoader workers ignore it. The DeepSpeed launcher would answer TERM by killing its ranks, so
# for it TERM is passed on as USR1 (same meaning to the ranks, ignored by the launchers). A plain
# `scancel --signal=USR1 JOBID` reaches the tasks directly with the same result. Either way the job
# requeues itself and the requeued job resumes from `latest`.
PREEMPTED_BY=
forward() {
  PREEMPTED_BY=$1
  local sig=$1
  [ "${MGPT4_LAUNCHER:-srun}" = deepspeed ] && sig=USR1
  echo "[job] got $1: asking the ranks to checkpoint (sending $sig)"
  scancel --signal="$sig" "$SLURM_JOB_ID" 2>/dev/null || kill -"$sig" "$SRUN_PID" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# --kill-on-bad-exit: one rank (or one node's launcher) dying ends the step instead of leaving the
# others in a collective.
if [ "${MGPT4_LAUNCHER:-srun}" = deepspeed ]; then
  # The hostfile lists the allocation's nodes in Slurm's order; every node's launcher reads the same
  # file and starts its own ranks (--no_ssh, node rank = its line), so no ssh between nodes is needed.
  # The names are only labels for DeepSpeed; the rendezvous goes to MASTER_ADDR.
  HOSTFILE="$RUN_DIR/slurm/hostfile_${SLURM_JOB_ID}"
  scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$TASKS_PER_NODE/" > "$HOSTFILE"
  # Slurm signals every process of the step, the launchers included, and a Python process dies of
  # an unhandled USR1; ignored here, the setting reaches the launchers, and the ranks install their
  # own handler (checkpoint and exit 0, which the launchers pass on).
  # --whole: the one task per node gets all of the job's CPUs there, not one, for all its ranks.
  srun --nodes="$NODES" --ntasks-per-node=1 --ntasks="$NODES" --whole --kill-on-bad-exit=1 --cpu-bind=none \
    bash -c 'trap "" USR1; NODE_RANK=$SLURMD_NODENAME exec bash "$0" "$@"' \
    "$HERE/../launch/deepspeed_hostfile.sh" "$HOSTFILE" "$CONFIG" "$@" &
else
  srun --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --ntasks=$((NODES * TASKS_PER_NODE)) \
    --kill-on-bad-exit=1 --cpu-bind=none \
    python -u -m mgpt4_dist.train --config "$CONFIG" "$@" &
fi
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives; keep waiting until srun has really exited.
while :; do
  wait "$SRUN_PID"; RC=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done

LATEST=$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo none)
echo "[job] $(date -u +%FT%TZ) training exited with $RC (latest checkpoint: $LATEST)"
# Exit codes (mgpt4_dist/errors.py, README "Exit codes"). With --kill-on-bad-exit the first rank to
# leave with 75 makes srun kill the others (they leave together after a barrier, so nothing is
# lost, but srun may then report the signal instead of 75): a signal this shell forwarded also
# counts as a preemption.
if [ "$RC" -eq 0 ] && [ "$LATEST" = "$(printf 'step_%08d' "$LAST_STEP")" ]; then
  exit 0
elif [ "$RC" -eq 2 ] || [ "$RC" -eq 3 ]; then
  echo "[job] exit $RC ($([ "$RC" -eq 2 ] && echo 'user error: fix the config, data or checkpoint' || echo 'non-finite losses')): not requeued"
  exit "$RC"
elif [ "$RC" -eq 75 ] || [ "$RC" -eq 0 ] || [ -n "$PREEMPTED_BY" ]; then
  echo "[job] stopped early at $LATEST (preempted${PREEMPTED_BY:+ by $PREEMPTED_BY}): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "[job] scontrol requeue failed: resubmit the same command to resume from $LATEST" >&2
  exit 75
fi
if [ "$RC" -gt 128 ]; then CAUSE="a rank was killed by signal $((RC - 128))"
elif [ "$RC" -eq 4 ]; then CAUSE="a peer rank died or hung (exit 4)"
else CAUSE="exit $RC"; fi
if [ "$CRASHES" -lt "$MAX_RESTARTS" ]; then
  echo $((CRASHES + 1)) > "$CRASH_FILE"
  echo "[job] crash: $CAUSE; crash restart $((CRASHES + 1))/$MAX_RESTARTS from $LATEST: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "[job] scontrol requeue failed" >&2
fi
echo "[job] crash: $CAUSE; no crash restarts left ($CRASHES/$MAX_RESTARTS, MGPT4_MAX_RESTARTS): job failed, latest checkpoint $LATEST"
exit "$RC"
