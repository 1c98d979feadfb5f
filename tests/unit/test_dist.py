"""dist.py reads ranks from Slurm variables and derives a per-job rendezvous port."""
import pytest
import torch

from mgpt4_dist import dist


def test_slurm_ranks_and_port(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert dist.world_info_from_env() == dist.WorldInfo(3, 1, 4, "slurm")
    assert dist.slurm_master_port("12345") == dist.slurm_master_port(12345) == 32345
    assert 20000 <= dist.slurm_master_port("99999999") < 40000


def test_node_name_prefers_slurm(monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "node7")
    assert dist.node_name() == "node7"


@pytest.mark.parametrize("error,expected", [
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (torch.distributed.DistBackendError("NCCL watchdog"), True),
])
def test_collective_failures_are_told_apart(error, expected):
    assert dist.is_collective_failure(error) is expected
