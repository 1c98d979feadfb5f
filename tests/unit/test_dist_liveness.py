"""dist.mark_step / describe_collective_failure: the hung-rank error names the rank that fell behind."""
import pytest
import torch

from mgpt4_dist import dist


@pytest.fixture
def store(monkeypatch):
    s = torch.distributed.HashStore()
    monkeypatch.setattr(dist, "_store", lambda: s)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SLURMD_NODENAME", "node1")
    monkeypatch.delenv("MGPT4_TEST_HANG", raising=False)
    return s


def test_the_rank_behind_is_named(store):
    for rank, step in ((0, 5), (1, 4), (2, 5)):
        dist.mark_step(rank, step)
    msg = dist.describe_collective_failure(RuntimeError("Timed out waiting 30000ms for recv"), 0.5)
    assert msg.startswith("rank 0 on node1: a collective failed (Timed out waiting 30000ms for recv)")
    assert "Stopped answering: rank 1 (node node1" in msg and "last started step 4" in msg
    assert "rank 2 (" not in msg and "other ranks started step 5" in msg


def test_a_rank_that_never_reported_is_named(store):
    dist.mark_step(0, 1)
    dist.mark_step(1, 1)
    msg = dist.describe_collective_failure(RuntimeError("Connection closed by peer"), 10)
    assert "rank 2 (never reported a step)" in msg


def test_same_step_everywhere_says_the_failure_is_inside_it(store):
    for rank in range(3):
        dist.mark_step(rank, 7)
    msg = dist.describe_collective_failure(RuntimeError("x"), 10)
    assert "Every rank started step 7" in msg and "Stopped answering" not in msg


def test_test_hang_hook_rejects_a_malformed_value(store, monkeypatch):
    monkeypatch.setenv("MGPT4_TEST_HANG", "3")
    with pytest.raises(ValueError, match="expected RANK:STEP"):
        dist.mark_step(0, 1)
    monkeypatch.setenv("MGPT4_TEST_HANG", "1:9")
    dist.mark_step(0, 9)  # another rank's hang point: returns
