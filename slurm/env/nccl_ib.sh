# NCCL/network settings for InfiniBand clusters; sourced by slurm/job.sh when
# MGPT4_NCCL_ENV=slurm/env/nccl_ib.sh. Adjust interface names to your cluster (`ip -br link`).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                  # INFO once when diagnosing a hang
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}  # bootstrap over a real interface
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$NCCL_SOCKET_IFNAME}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
# A dead peer surfaces as an error (then srun --kill-on-bad-exit ends the job) instead of a hang;
# the timeout itself is parallel.timeout_minutes.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
