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

from helpers import BIN, REPO, TINY_STAGE1, TINY_STAGE2, read_metrics
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


CHAOS_STEPS, CHAOS_EVERY = 40, 4


def losses(run_dir):
    # A crashed attempt logged steps past its last checkpoint; the restarted one dropped them before
    # training them again: every step once, in order.
    records = read_metrics(run_dir)
    assert [m["step"] for m in records] == list(range(1, len(records) + 1)), [m["step"] for m in records]
    return {m["step"]: m["loss"] for m in records}


@pytest.fixture(scope="module")
def two_node_run(cluster, tiny_assets, tmp_path_factory):
    """An uninterrupted 2-node stage-1 job: tested below, and the reference of the crash-restart test."""
    run_dir = str(tmp_path_factory.mktemp("two_nodes") / "run")
    t0 = time.time()
    job = submit(cluster, "stage1.sbatch", TINY_STAGE1, [*tiny_assets["overrides"], f"run_dir={run_dir}",
                 f"train.max_steps={CHAOS_STEPS}", "train.log_every=1", f"checkpoint.every_steps={CHAOS_EVERY}"],
                 nodes=2)
    info = cluster.wait_job(job, timeout=240)
    print(f"stage1 2 nodes: {time.time() - t0:.1f}s")
    return run_dir, job, info


def test_stage1_trains_on_two_nodes(two_node_run):
    run_dir, job, info = two_node_run
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    ranks = rank_lines(log)
    assert sorted(ranks) == [0, 1] and {ranks[0][0], ranks[1][0]} == {"node1", "node2"}, log
    assert "(slurm launcher)" in log and "backend gloo" in log
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, CHAOS_STEPS + 1))
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == f"step_{CHAOS_STEPS:08d}"


def test_stage1_deepspeed_launcher_on_two_nodes(cluster, tiny_assets, tmp_path):
    run_dir = str(tmp_path / "run")
    t0 = time.time()
    job = submit(cluster, "stage1_deepspeed.sbatch", TINY_STAGE1, [*tiny_assets["overrides"], f"run_dir={run_dir}",
                 "train.max_steps=3", "train.log_every=1"], nodes=2)
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


def wait_restarts(cluster, job, run_dir, n, timeout=180):
    # A requeued job is held for cred_expire seconds (Reason=BeginTime), then started again. (Releasing
    # it sooner by hand can start it within the second its old credential was revoked: the nodes then
    # refuse it and it fails.)
    deadline = time.time() + timeout
    while (info := cluster.job(job)).get("Restarts") != str(n):
        assert time.time() < deadline and info["JobState"] in ("RUNNING", "COMPLETING", "PENDING"), \
            (info, job_log(run_dir, job)[-4000:])
        time.sleep(0.2)


def wait_for_new_steps(run_dir, job, after_records, n, timeout=240):
    """The requeued job trains: n more metrics records than `after_records`."""
    deadline = time.time() + timeout
    while len(read_metrics(run_dir)) < after_records + n:
        assert time.time() < deadline, job_log(run_dir, job)[-4000:]
        time.sleep(0.05)


# Preempted twice: USR1 (the time limit, --signal=B:USR1@120), then TERM (preemption), both sent to the
# batch shell only (scancel --batch), which passes them on. Slurm delivers them to every process of the
# step: the DataLoader workers and, in the DeepSpeed variant, the launchers must survive them.
@pytest.mark.parametrize("script", ["stage1.sbatch", "stage1_deepspeed.sbatch"])
def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tiny_assets, tmp_path, script):
    run_dir, max_steps = str(tmp_path / "run"), 60
    t0 = time.time()
    job = submit(cluster, script, TINY_STAGE1, [*tiny_assets["overrides"], f"run_dir={run_dir}",
                 f"train.max_steps={max_steps}", "train.log_every=1", "checkpoint.every_steps=1000"], nodes=2)
    wait_for_step(run_dir, 2, timeout=180)
    for restarts, sig in enumerate(["USR1", "TERM"], start=1):
        cluster.run(["scancel", f"--signal={sig}", "--batch", str(job)])
        wait_restarts(cluster, job, run_dir, restarts)
        if restarts == 1:
            wait_for_new_steps(run_dir, job, len(read_metrics(run_dir)), 2)
    info = cluster.wait_job(job, timeout=240, until=("COMPLETED", "FAILED", "CANCELLED"))
    log = job_log(run_dir, job)
    print(f"preempt (USR1, TERM) + requeue ({script}): {time.time() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", \
        (info, log[-4000:], cluster.batch_output(job), cluster.log_tail())
    assert log.count("resumed from") == 2 and "DataLoader worker" not in log, log[-4000:]
    stops = [(int(step), sig) for step, sig in re.findall(r"stopped early at step_(\d+) \(preempted by (\w+)\)", log)]
    assert [sig for _, sig in stops] == ["USR1", "TERM"], log[-4000:]
    assert 2 <= stops[0][0] < stops[1][0] < max_steps, stops
    # Every rank left with 75 (checkpointed, resumable), after the others were done. srun passes it on,
    # unless it ended the step on the first 75 (--kill-on-bad-exit) while a DeepSpeed launcher, which
    # looks at its ranks once a second, had not yet left: then it reports that launcher's TERM (143).
    assert log.count("checkpointed, resume with the same command (exit 75)") == 4, log[-4000:]
    assert set(re.findall(r"training exited with (\d+)", log)) <= {"75", "143", "0"}, log[-4000:]
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, max_steps + 1)), steps  # no step repeated or lost
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == f"step_{max_steps:08d}"


def test_job_restarts_after_crashes_and_ends_like_an_uninterrupted_run(cluster, two_node_run, tiny_assets,
                                                                         tmp_path):
    """Ranks killed with SIGKILL at random steps, twice: srun ends the step (fail-fast), the job requeues
    itself (crash restarts, MGPT4_MAX_RESTARTS=3 by default) and ends with the reference's losses."""
    import random

    seed = int(os.environ.get("MGPT4_CHAOS_SEED", time.time()))
    rng = random.Random(seed)
    run_dir = str(tmp_path / "run")
    t0 = time.time()
    job = submit(cluster, "stage1.sbatch", TINY_STAGE1, [*tiny_assets["overrides"], f"run_dir={run_dir}",
                 f"train.max_steps={CHAOS_STEPS}", "train.log_every=1", f"checkpoint.every_steps={CHAOS_EVERY}",
                 "parallel.timeout_minutes=1"], nodes=2)
    kills = []
    for attempt in range(2):
        wait_for_step(run_dir, 1, timeout=180)
        # The first kill comes early, often before the first checkpoint (a restart from step 0 in a run
        # dir that already has metrics), the second anywhere.
        wait_for_new_steps(run_dir, job, len(read_metrics(run_dir)), rng.randint(1, 2) if attempt == 0 else rng.randint(1, 8))
        rank = rng.randint(0, 1)
        node, pid = rank_lines(job_log(run_dir, job).split("[job]")[-1])[rank]
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        kills.append((rank, node, max(m["step"] for m in read_metrics(run_dir))))
        while f"crash restart {attempt + 1}/3" not in job_log(run_dir, job):
            assert time.time() - killed < 120, f"job still running {time.time() - killed:.0f}s after a rank died"
            time.sleep(0.1)
        print(f"chaos: rank {rank} killed near step {kills[-1][2]}; crash restart after {time.time() - killed:.1f}s")
        wait_restarts(cluster, job, run_dir, attempt + 1)
    info = cluster.wait_job(job, timeout=300, until=("COMPLETED", "FAILED", "CANCELLED"))
    log = job_log(run_dir, job)
    print(f"chaos (seed {seed}, kills {kills}): {time.time() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", (info, log[-4000:])
    # The log names each dead rank (srun's task id = global rank), its node, and the cause.
    for rank, node, _ in kills:
        assert re.search(rf"srun: error: {node}: task {rank}: Killed", log), log[-4000:]
    assert "crash: a rank was killed by signal 9" in log or "crash: a peer rank died" in log, log[-4000:]
    # Each restart resumed from the latest checkpoint, or started again from step 0 when the kill came
    # before the first one.
    restarts = log.count("resumed from") + log.count("stopped before its first checkpoint")
    assert "DataLoader worker" not in log and restarts == 2, log[-4000:]
    assert losses(run_dir) == losses(two_node_run[0])  # fp32, same world size: bitwise equal


def test_job_fails_fast_when_a_rank_hangs(cluster, tiny_assets, tmp_path):
    # Rank 1 stops answering without dying (MGPT4_TEST_HANG, read in dist.mark_step): only the collective
    # timeout can end this job. MGPT4_MAX_RESTARTS=0: fail-fast alone, no crash restart. Run through the DeepSpeed launcher variant, whose launchers must pass
    # the failure on as well.
    run_dir = str(tmp_path / "run")
    job = submit(cluster, "stage1_deepspeed.sbatch", TINY_STAGE1, [
        *tiny_assets["overrides"], f"run_dir={run_dir}", "train.max_steps=100000", "train.log_every=1",
        "checkpoint.every_steps=100000", "parallel.timeout_minutes=0.5"],
        nodes=2, env={"MGPT4_TEST_HANG": "1:3", "MGPT4_MAX_RESTARTS": "0"})
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
    assert info["Restarts"] == "0" and "no crash restarts left (0/0, MGPT4_MAX_RESTARTS)" in log, log[-4000:]
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
                 "train.max_steps=3"])
    info = cluster.wait_job(job, timeout=180)
    log = job_log(run_dir, job)
    print(f"stage2 1 node: {time.time() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "1 node(s) x 1 task(s)" in log
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step_00000003"


def test_user_error_is_never_requeued(cluster, tiny_assets, tmp_path):
    # The config is valid (job.sh's check passes); the rank finds the LLM folder missing: exit 2.
    run_dir = str(tmp_path / "run")
    job = submit(cluster, "stage2.sbatch", TINY_STAGE2, [*tiny_assets["overrides"], f"run_dir={run_dir}",
                 f"model.llm_path={tmp_path / 'no_such_llm'}"])
    info = cluster.wait_job(job, timeout=180)
    log = job_log(run_dir, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", (info, log[-3000:])
    assert "mgpt4-train: error: model.llm_path=" in log and "exit 2 (user error" in log and "not requeued" in log, \
        log[-3000:]
