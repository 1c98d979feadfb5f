"""The start-of-job environment report: versions, backend and where every rank runs.

Printed once by rank 0 to standard output (so it lands in the Slurm job log), e.g.
    [env] python 3.11.2, torch 2.5.1, deepspeed 0.19.8, backend gloo, world 2 (slurm launcher)
    [env] rank 0 local_rank 0 node node1 host myhost pid 1234 device cpu
Tests parse the `[env] rank` lines, and a person reading a hung job's log uses them to find the
host and pid of each rank.
"""
from __future__ import annotations

import os
import platform
import socket
from importlib import metadata

import torch
import torch.distributed as torch_dist

from mgpt4_dist import dist


def _version(package: str) -> str:
    # Package metadata, not an import: only parallel/ imports deepspeed.
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def rank_line(info: dist.WorldInfo, device: torch.device) -> str:
    return (f"rank {info.rank} local_rank {info.local_rank} node {dist.node_name()} "
            f"host {socket.gethostname()} pid {os.getpid()} device {device}")


def report_environment(info: dist.WorldInfo, device: torch.device) -> None:
    """Collective: every rank must call it (it gathers one line per rank)."""
    lines = dist.all_gather_object(rank_line(info, device))
    if info.rank != 0:
        return
    backend = torch_dist.get_backend() if torch_dist.is_initialized() else "none"
    cuda = f", cuda {torch.version.cuda}, nccl {'.'.join(map(str, torch.cuda.nccl.version()))}" \
        if torch.cuda.is_available() else ""
    print(f"[env] python {platform.python_version()}, torch {torch.__version__}, deepspeed {_version('deepspeed')}"
          f"{cuda}, backend {backend}, world {info.world_size} ({info.launcher} launcher), "
          f"master {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}", flush=True)
    for line in lines:
        print(f"[env] {line}", flush=True)
