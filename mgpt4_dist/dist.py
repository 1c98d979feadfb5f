"""Process-group setup: the only module that reads rank and world variables from the environment.

Launchers announce ranks differently: torchrun and the deepspeed launcher set RANK/WORLD_SIZE/
LOCAL_RANK, `srun` sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, mpirun sets OMPI_COMM_WORLD_*.
`world_info_from_env` reads them all in one place; a process with none of them is a world of one.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mgpt4_dist import testing_hooks


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


def _elastic_attempt_store(info: WorldInfo, timeout: datetime.timedelta):
    """Under torchrun, a store of this restart attempt's own keys; None elsewhere.

    torchrun's agent serves one TCPStore at MASTER_ADDR:MASTER_PORT for the whole job and keeps it
    across worker restarts (static --master-port and the c10d rendezvous alike; torch.distributed's
    env:// rendezvous connects to it without a per-attempt prefix). A restarted rank joining the
    process group then finds the previous attempt's keys: gloo reads a dead peer's listening address
    ("Gloo connectFullMesh failed ... Connection refused") and the heartbeats report dead pids. Keys
    under `mgpt4/attempt_<TORCHELASTIC_RESTART_COUNT>/` cannot collide. On several nodes the agents
    count alike when a dead rank breaks every node's collectives (every node's workers fail, every
    agent counts a restart); an agent that restarts healthy workers only because another node
    re-joined counts none, and then the ranks wait for each other until parallel.timeout_minutes:
    torch exposes no attempt id that all nodes share.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"mgpt4/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store = _elastic_attempt_store(info, timeout)
        if store is not None:
            dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return info, device


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


# Liveness. Every rank records the step it is starting in the rendezvous store (a key per rank,
# served by a thread in rank 0's process, so it answers even while rank 0's main thread waits in a
# collective). When a collective fails, a surviving rank reads them to name the rank that fell behind:
# a timeout by itself only says that *some* peer did not answer.
_HEARTBEAT_KEY = "mgpt4/heartbeat/"
def _store():
    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except (AttributeError, ValueError, RuntimeError):
        return None


def mark_step(rank: int, step: int) -> None:
    """Called by every rank as it starts `step` (1-based): records it for `describe_collective_failure`."""
    testing_hooks.hang_if_asked(rank, step, node_name())
    store = _store()
    if store is None or _world_size() == 1:
        return
    try:
        store.set(f"{_HEARTBEAT_KEY}{rank}", json.dumps(
            {"step": step, "node": node_name(), "host": socket.gethostname(), "pid": os.getpid(),
             "time": time.time()}))
    except (RuntimeError, dist.DistError):
        pass  # the store lives in rank 0: if it is gone, the next collective reports that


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def _heartbeats(world_size: int) -> dict[int, dict]:
    store = _store()
    if store is None:
        return {}
    beats = {}
    try:
        store.set_timeout(datetime.timedelta(seconds=5))
        for r in range(world_size):
            key = f"{_HEARTBEAT_KEY}{r}"
            if store.check([key]):
                beats[r] = json.loads(store.get(key))
    except (RuntimeError, dist.DistError, ValueError):
        pass  # rank 0 (the store) is gone: report what was read
    return beats


def describe_collective_failure(error: BaseException, timeout_minutes: float) -> str:
    """The error a rank prints when a collective failed: who it is, and which rank(s) stopped answering."""
    rank = int(os.environ.get("RANK", "-1"))
    world = _world_size()
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = (f"rank {rank} on {node_name()}: a collective failed ({reason}); timeout "
            f"parallel.timeout_minutes={timeout_minutes:g}.")
    beats = _heartbeats(world)
    if not beats:
        return text + (" A peer rank died or hung; the [env] rank lines at the top of the job log give each "
                       "rank's host and pid.")
    now, newest = time.time(), max(b["step"] for b in beats.values())
    behind = {r: b for r, b in beats.items() if b["step"] < newest}
    silent = [r for r in range(world) if r not in beats]

    def who(r, b):
        return (f"rank {r} (node {b['node']}, host {b['host']}, pid {b['pid']}) last started step {b['step']} "
                f"{now - b['time']:.0f}s ago")
    if behind or silent:
        lagging = [who(r, b) for r, b in sorted(behind.items())]
        lagging += [f"rank {r} (never reported a step)" for r in silent]
        return (text + f" Stopped answering: {'; '.join(lagging)}, while the other ranks started step {newest}. "
                "Look at that rank: a hang (py-spy dump --pid PID) or a crash (its node's log).")
    return (text + f" Every rank started step {newest}, so the failure is inside that step: a rank died or hung "
            "there (or a collective was entered by only some ranks). Ranks: "
            + "; ".join(who(r, b) for r, b in sorted(beats.items())) + ".")
