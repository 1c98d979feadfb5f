"""Faults outside Slurm, with the shipped tiny config's DataLoader worker (never data.num_workers=0):
Ctrl-C on an interactive run (checkpoint and exit 75; a second Ctrl-C stops at once), and torchrun
restarting ranks killed with SIGKILL, with a static --master-port and with the c10d rendezvous, until
the run ends with the losses of an uninterrupted one. (Slurm's versions: tests/e2e/test_slurm.py.)"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import BIN, REPO, TINY_STAGE1, free_port, read_metrics

pytestmark = pytest.mark.slow
# The Slurm tests' DeepSpeed op cache (see test_slurm.py): a restarted rank would otherwise rebuild it.
EXT_DIR = os.path.expanduser("~/.cache/mgpt4_slurm_tests/torch_extensions")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": EXT_DIR}
MAX_STEPS, EVERY = 24, 4


def args(tiny_assets, run_dir, *extra):
    return ["--config", TINY_STAGE1, *tiny_assets["overrides"], f"run_dir={run_dir}", f"train.max_steps={MAX_STEPS}",
            "train.log_every=1", f"checkpoint.every_steps={EVERY}", *extra]


def start(cmd, log_path, env=None):
    log = open(log_path, "w")
    # A session of its own: a terminal's Ctrl-C reaches the whole foreground process group, workers included.
    return subprocess.Popen(cmd, cwd=REPO, env={**ENV, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_until(predicate, timeout, what, proc=None, log_path=None):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline or (proc is not None and proc.poll() is not None):
            tail = open(log_path).read()[-4000:] if log_path else ""
            raise AssertionError(f"{what}: not after {timeout}s (exit {proc and proc.poll()})\n{tail}")
        time.sleep(0.05)


def records(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return read_metrics(run_dir) if os.path.exists(path) else []


def rank_pids(log_path):
    """rank -> pid of every attempt's ranks, in order of attempts."""
    found = re.findall(r"\[env\] rank (\d+) local_rank \d+ node \S+ host \S+ pid (\d+)", open(log_path).read())
    attempts, current = [], {}
    for rank, pid in found:
        if int(rank) in current:
            attempts.append(current)
            current = {}
        current[int(rank)] = int(pid)
    return attempts + [current] if current else attempts


def losses(run_dir):
    # A killed attempt logged steps past its last checkpoint; the restarted one dropped them before
    # training them again: every step once, in order.
    records = read_metrics(run_dir)
    assert [m["step"] for m in records] == list(range(1, len(records) + 1)), [m["step"] for m in records]
    return {m["step"]: m["loss"] for m in records}


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    """The uninterrupted 2-rank run the restarted ones must match."""
    run_dir = str(tmp_path_factory.mktemp("reference") / "run")
    cmd = [os.path.join(BIN, "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "mgpt4_dist.train", *args(tiny_assets, run_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return losses(run_dir)


def test_ctrl_c_checkpoints_and_exits_75_and_a_second_one_stops_at_once(tiny_assets, tmp_path):
    # Ctrl-C as a terminal sends it: SIGINT to the foreground process group, the rank and its 2 workers.
    run_dir, log_path = str(tmp_path / "run"), str(tmp_path / "log")
    t0 = time.time()
    proc = start([sys.executable, "-m", "mgpt4_dist.train", *args(tiny_assets, run_dir, "data.num_workers=2")],
                 log_path)
    wait_until(lambda: len(records(run_dir)) >= 2, 300, "step 2", proc, log_path)
    os.killpg(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=120)
    log = open(log_path).read()
    assert rc == 75, log[-4000:]
    stopped = int(re.search(r"stopped by SIGINT at step (\d+): checkpointed", log).group(1))
    assert 2 <= stopped < MAX_STEPS
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == f"step_{stopped:08d}"
    assert "DataLoader worker" not in log and "Traceback" not in log, log[-4000:]

    # Resumed, and interrupted twice while it writes its next checkpoint: no waiting for the save.
    pause_at = (stopped // EVERY + 1) * EVERY
    proc = start([sys.executable, "-m", "mgpt4_dist.train", *args(tiny_assets, run_dir, "data.num_workers=2")],
                 log_path, env={"MGPT4_TEST_SAVE_PAUSE": f"{pause_at}:120"})
    wait_until(lambda: "MGPT4_TEST_SAVE_PAUSE" in open(log_path).read(), 300, "the paused save", proc, log_path)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=30)
    log = open(log_path).read()
    print(f"ctrl-c: {time.time() - t0:.1f}s")
    assert rc == -signal.SIGINT, log[-4000:]  # its default action, at once: no waiting for the save
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == f"step_{stopped:08d}"


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_torchrun_restarts_killed_ranks_and_ends_like_an_uninterrupted_run(tiny_assets, reference, tmp_path,
                                                                            rendezvous):
    run_dir, log_path = str(tmp_path / "run"), str(tmp_path / "log")
    port = free_port()
    rdzv = (["--master-port", str(port)] if rendezvous == "static"
            else ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"])
    t0 = time.time()
    proc = start([os.path.join(BIN, "torchrun"), "--nproc-per-node", "2", "--max-restarts", "2", *rdzv,
                  "-m", "mgpt4_dist.train", *args(tiny_assets, run_dir)], log_path)
    # Two crashes, each after the restarted attempt made progress: rank 1, then rank 0.
    for attempt, (rank, after) in enumerate([(1, 6), (0, 3)]):
        wait_until(lambda: len(rank_pids(log_path)) > attempt and len(rank_pids(log_path)[attempt]) == 2, 300,
                   f"attempt {attempt} started", proc, log_path)
        seen = len(records(run_dir))
        wait_until(lambda: len(records(run_dir)) >= seen + after, 300, f"attempt {attempt} trained", proc, log_path)
        os.kill(rank_pids(log_path)[attempt][rank], signal.SIGKILL)
    rc = proc.wait(timeout=600)
    log = open(log_path).read()
    print(f"torchrun --max-restarts 2 ({rendezvous}), 2 kills: {time.time() - t0:.1f}s")
    assert rc == 0, log[-5000:]
    assert len(rank_pids(log_path)) == 3 and log.count("resumed from") == 2, log[-5000:]
    assert "connectFullMesh" not in log and "DataLoader worker" not in log, log[-5000:]
    assert losses(run_dir) == reference  # fp32 on CPU/gloo, same world size: bitwise equal
