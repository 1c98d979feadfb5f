"""slurm/stage1.sbatch, stage1_deepspeed.sbatch and stage2.sbatch on a real Slurm cluster of two nodes
on localhost: multi-node training (srun and DeepSpeed launcher), preemption + requeue with exact resume,
fail-fast when a rank dies or hangs."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import BIN, REPO, TINY_STAGE1, TINY_STAGE2, read_metrics
from slurm_cluster import SlurmCluster, ensure_installed

pytestmark = pytest.mark.slow
# DeepSpeed JIT-compiles its CPU ops on first use; concurrent DeepSpeed runs on this machine rebuilding
# the shared ~/.cache/torch_extensions made jobs wait minutes, so these tests keep their own, built once.
EXT_DIR = os.path.expanduser("~/.cache/mgpt4_slurm_tests/torch_extensions")


@pytest.fixture(scope="module")
def cluster():
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster().start()
    warm = "from deepspeed.accelerator import get_accelerator as a\n" \
           "for n in ('ShareMemCommBuilder', 'CPUAdamBuilder'): a().create_op_builder(n).load()"
    subprocess.run([sys.executable, "-c", warm], env={**os.environ, "TORCH_EXTENSIONS_DIR": EXT_DIR},
                   capture_output=True, timeout=900)
    yield c
    c.stop()


def submit(cluster, script, config, overrides, nodes=1, env=None):
    # The job uses the submitting shell's Python environment, as a user's would.
    env = {"PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": EXT_DIR,
           **(env or {})}
    # The batch shell's own output (before job.sh copies it to the run dir) goes to the cluster's logs.
    return cluster.sbatch(["--nodes", str(nodes), "--output", os.path.join(cluster.root, "log", "batch-%j.out"),
                           os.path.join(REPO, "slurm", script),
                           config, *overrides], env=env, cwd=REPO)


def job_log(run_dir, job_id):
    path = os.path.join(run_dir, "slurm", f"job_{job_id}.out")
    return open(path).read() if os.path.exists(path) else ""


def wait_for_step(run_dir, step, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and any(
                m["step"] >= step for m in read_metrics(run_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {run_dir}/metrics.jsonl after {timeout}s")


def rank_lines(log):
    """rank -> (node, pid) from the env report."""
    return {int(r): (node, int(pid)) for r, node, pid in
            re.findall(r"\[env\] rank (\d+) local_rank \d+ node (\S+) host \S+ pid (\d+)", log)}


def test_stage1_trains_on_two_nodes(cluster, tiny_assets, tmp_path):
    run_dir = str(tmp_path / "run")
    t0 = time.time()
    job = submit(cluster, "stage1.sbatch", TINY_STAGE1, [*tiny_assets["overrides"], f"run_dir={run_dir}",
                 "train.max_steps=4", "train.log_every=1", "data.num_workers=0"], nodes=2)
    info = cluster.wait_job(job, timeout=180)
    log = job_log(run_dir, job)
    print(f"stage1 2 nodes: {time.time() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    ranks = rank_lines(log)
    assert sorted(ranks) == [0, 1] and {ranks[0][0], ranks[1][0]} == {"node1", "node2"}, log
    assert "(slurm launcher)" in log and "backend gloo" in log
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step_00000004"


def test_stage1_deepspeed_launcher_on_two_nodes(cluster, tiny_assets, tmp_path):
    run_dir = str(tmp_path / "run")
    t0 = time.time()
    job = submit(cluster, "stage1_deepspeed.sbatch", TINY_STAGE1, [*tiny_assets["overrides"], f"run_dir={run_dir}",
                 "train.max_steps=3", "train.log_every=1", "data.num_workers=0"], nodes=2)
    info = cluster.wait_job(job, timeout=240)
    log = job_log(run_dir, job)
    print(f"stage1 deepspeed launcher 2 nodes: {time.time() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert open(os.path.join(run_dir, "slurm", f"hostfile_{job}")).read() == "node1 slots=1\nnode2 slots=1\n"
    ranks = rank_lines(log)
    assert sorted(ranks) == [0, 1] and ranks[0][0] == "node1" and ranks[1][0] == "node2", log
    assert "(deepspeed launch)" in log and "world 2 (env launcher)" in log and "backend gloo" in log
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step_00000003"


# The DeepSpeed variant also checks that its launchers survive the USR1 Slurm sends to every process.
# TERM (what preemption sends) takes the same path in stage1.sbatch; the DeepSpeed launcher answers
# TERM by stopping its ranks, so that script relies on Slurm's own requeue for it (see its header).
@pytest.mark.parametrize("script,sig", [("stage1.sbatch", "USR1"), ("stage1_deepspeed.sbatch", "USR1"),
                                        ("stage1.sbatch", "TERM")])
def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tiny_assets, tmp_path, script, sig):
    run_dir, max_steps = str(tmp_path / "run"), 30
    t0 = time.time()
    job = submit(cluster, script, TINY_STAGE1, [*tiny_assets["overrides"], f"run_dir={run_dir}",
                 f"train.max_steps={max_steps}", "train.log_every=1", "checkpoint.every_steps=1000",
                 "data.num_workers=0"], nodes=2)
    wait_for_step(run_dir, 2, timeout=180)
    # What the time limit does through --signal=B:USR1@120: signal the batch shell only.
    cluster.run(["scancel", f"--signal={sig}", "--batch", str(job)])
    # The job requeues itself; Slurm holds it for cred_expire seconds (Reason=BeginTime), then starts it
    # again. (Releasing it sooner by hand can start it within the second its old credential was
    # revoked: the nodes then refuse it and it fails.)
    deadline = time.time() + 180
    while (info := cluster.job(job)).get("Restarts") != "1":
        assert time.time() < deadline and info["JobState"] in ("RUNNING", "COMPLETING"), \
            (info, job_log(run_dir, job)[-4000:])
        time.sleep(0.2)
    info = cluster.wait_job(job, timeout=240, until=("COMPLETED", "FAILED", "CANCELLED"))
    log = job_log(run_dir, job)
    print(f"preempt ({sig}) + requeue ({script}): {time.time() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", \
        (info, log[-4000:], cluster.batch_output(job), cluster.log_tail())
    assert "requeueing job" in log and "resumed from" in log, log[-4000:]
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, max_steps + 1)), steps  # no step repeated or lost
    preempted_at = int(re.search(r"stopped early at step_(\d+)", log).group(1))
    assert 2 <= preempted_at < max_steps
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == f"step_{max_steps:08d}"


def test_job_fails_fast_when_a_rank_dies(cluster, tiny_assets, tmp_path):
    run_dir = str(tmp_path / "run")
    job = submit(cluster, "stage1.sbatch", TINY_STAGE1, [*tiny_assets["overrides"], f"run_dir={run_dir}",
                 "train.max_steps=100000", "train.log_every=1", "checkpoint.every_steps=100000",
                 "data.num_workers=0", "parallel.timeout_minutes=1"], nodes=2)
    wait_for_step(run_dir, 2, timeout=180)
    node, pid = rank_lines(job_log(run_dir, job))[1]
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    info = cluster.wait_job(job, timeout=150)
    took = time.time() - killed
    log = job_log(run_dir, job)
    print(f"fail-fast: job ended {took:.1f}s after rank 1 was killed")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", log[-4000:]
    assert info["Restarts"] == "0"  # a crash is not a preemption: no requeue
    assert took < 120, f"job took {took:.0f}s to end after a rank died"
    # The log names the dead rank (srun's task id = global rank) and its node.
    assert re.search(rf"srun: error: {node}: task 1: Killed", log), log[-4000:]


def test_job_fails_fast_when_a_rank_hangs(cluster, tiny_assets, tmp_path):
    # Rank 1 stops answering without dying (MGPT4_TEST_HANG, read in dist.mark_step): only the collective
    # timeout can end this job. Run through the DeepSpeed launcher variant, whose launchers must pass
    # the failure on as well.
    run_dir = str(tmp_path / "run")
    job = submit(cluster, "stage1_deepspeed.sbatch", TINY_STAGE1, [
        *tiny_assets["overrides"], f"run_dir={run_dir}", "train.max_steps=100000", "train.log_every=1",
        "checkpoint.every_steps=100000", "data.num_workers=0", "parallel.timeout_minutes=0.5"],
        nodes=2, env={"MGPT4_TEST_HANG": "1:3"})
    deadline = time.time() + 240
    while "stops answering at step 3" not in job_log(run_dir, job):
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            job_log(run_dir, job)[-3000:]
        time.sleep(0.1)
    hung = time.time()
    info = cluster.wait_job(job, timeout=150)
    took = time.time() - hung
    log = job_log(run_dir, job)
    print(f"hung rank: job ended {took:.1f}s after rank 1 stopped answering (timeout 30s)")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", log[-4000:]
    assert info["Restarts"] == "0"
    node, pid = rank_lines(log)[1]
    # The surviving rank names the one that stopped answering, with its node and pid.
    assert re.search(rf"rank 0 on node1: a collective failed .*Stopped answering: rank 1 \(node {node}, "
                     rf"host \S+, pid {pid}\) last started step 2", log), log[-4000:]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    assert took < 120, f"job took {took:.0f}s to end after a rank hung"


def test_stage2_on_one_node(cluster, tiny_assets, tmp_path):
    run_dir = str(tmp_path / "run")
    t0 = time.time()
    job = submit(cluster, "stage2.sbatch", TINY_STAGE2, [*tiny_assets["overrides"], f"run_dir={run_dir}",
                 "train.max_steps=3", "data.num_workers=0"])
    info = cluster.wait_job(job, timeout=180)
    log = job_log(run_dir, job)
    print(f"stage2 1 node: {time.time() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "1 node(s) x 1 task(s)" in log
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step_00000003"
