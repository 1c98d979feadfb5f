"""Process-group setup: the only module that reads rank and world variables from the environment.

Launchers announce ranks differently: torchrun and the deepspeed launcher set RANK/WORLD_SIZE/
LOCAL_RANK, `srun` sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, mpirun sets OMPI_COMM_WORLD_*.
`world_info_from_env` reads them all in one place; a process with none of them is a world of one.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # env | slurm | mpi | none


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm nodelist such as `node[1-3,7]` (scontrol knows the syntax best)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def world_info_from_env() -> WorldInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        return WorldInfo(rank, local, world, "env")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        return WorldInfo(rank, local, world, "slurm")
    if "OMPI_COMM_WORLD_RANK" in env:
        return WorldInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                         int(env["OMPI_COMM_WORLD_SIZE"]), "mpi")
    return WorldInfo(0, 0, 1, "none")


def slurm_master_port(job_id) -> int:
    """A rendezvous port every rank of a job derives alike, different for jobs that share a node.

    The same job id after a requeue gives the same port, which is fine: the old tasks are gone.
    """
    return 20000 + int(job_id or 0) % 20000


def node_name() -> str:
    """The Slurm node this process runs on (SLURMD_NODENAME), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(info: WorldInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(timeout_minutes: float = 10.0) -> tuple[WorldInfo, torch.device]:
    """Join (or create) the default process group: NCCL on GPUs, gloo on CPU.

    A world of one still gets a process group so the engines run the same code path.
    """
    info = world_info_from_env()
    # Publish what torch.distributed's env:// rendezvous expects, whatever the launcher.
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(info.rank), str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    if info.launcher == "slurm" and "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    if info.launcher == "slurm" and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(slurm_master_port(os.environ.get("SLURM_JOB_ID")))
    if info.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    device = device_for(info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return info, device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_reduce(value: float, op) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_max(value: float) -> float:
    return _all_reduce(value, dist.ReduceOp.MAX)


def all_reduce_sum(value: float) -> float:
    return _all_reduce(value, dist.ReduceOp.SUM)


def all_gather_object(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# Messages of the errors gloo/NCCL raise when a peer process dies or a collective times out
# (older torch raises plain RuntimeError rather than DistBackendError for some of them).
_COLLECTIVE_FAILURE_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "timed out",
                               "broken pipe", "peer", "socket")


def is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(m in text for m in _COLLECTIVE_FAILURE_MARKERS)
