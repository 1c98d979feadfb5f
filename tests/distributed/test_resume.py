"""Checkpoint lifecycle with real processes: kill -9 mid-save, resume on another world size or ZeRO
stage, and a checkpoint for another model refused before training."""
import os
import signal
import subprocess
import time

import pytest

from conftest import BIN, REPO, TINY_STAGE1, free_port, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def common(tiny_assets, *extra):
    return ["--config", TINY_STAGE1, *tiny_assets["overrides"], "train.log_every=1", "data.num_workers=0", *extra]


def last_loss_per_step(run_dir):
    # A killed run may have logged steps that the resumed run repeats: the last record wins.
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def test_kill9_during_save_resumes_from_previous_checkpoint_exactly(tiny_assets, run_train, tmp_path):
    args = common(tiny_assets, "train.max_steps=7", "checkpoint.every_steps=3", "checkpoint.keep_last=2")
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run_train(args + [f"run_dir={straight}"], launcher="torchrun")

    # Pause inside the save of step 6 (engine files written, not yet renamed) and kill -9 the job.
    cmd = [os.path.join(BIN, "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "mgpt4_dist.train", *args, f"run_dir={killed}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MGPT4_TEST_SAVE_PAUSE": "6:120"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    tmp_ckpt = os.path.join(killed, "checkpoints", ".tmp-step_00000006")
    deadline = time.time() + 240
    try:
        for line in proc.stdout:
            if "MGPT4_TEST_SAVE_PAUSE" in line or time.time() > deadline:
                break
        assert os.path.isdir(tmp_ckpt), "the save of step 6 never started"
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    root = os.path.join(killed, "checkpoints")
    assert open(os.path.join(root, "latest")).read() == "step_00000003"
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == ["step_00000003"]

    resumed = run_train(args + [f"run_dir={killed}"], launcher="torchrun")
    assert "resumed from" in resumed.stdout and "step_00000003" in resumed.stdout
    ref, got = last_loss_per_step(straight), last_loss_per_step(killed)
    assert sorted(got) == list(range(1, 8))
    for step in range(4, 8):  # fp32 on CPU/gloo: bitwise equal
        assert got[step] == ref[step], f"step {step}: {got[step]} vs {ref[step]}"
    assert not os.path.exists(tmp_ckpt), "the half-written checkpoint was not cleaned up"
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == ["step_00000006", "step_00000007"]


@pytest.fixture(scope="module")
def two_rank_checkpoint(tiny_assets, run_train, tmp_path_factory):
    """A 2-rank ZeRO-2 run stopped at step 3, with the global batch fixed at 16."""
    run_dir = str(tmp_path_factory.mktemp("two_rank") / "run")
    run_train(common(tiny_assets, "train.max_steps=5", "train.stop_at_step=3", "train.global_batch_size=16",
                     f"run_dir={run_dir}"), launcher="torchrun")
    return run_dir


def resume_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_two_ranks_on_one_keeps_state_and_global_batch(two_rank_checkpoint, tiny_assets, run_train,
                                                              tmp_path):
    losses = {}
    for stage in (2, 3):
        run_dir = resume_copy(two_rank_checkpoint, str(tmp_path / f"zero{stage}"))
        proc = run_train(common(tiny_assets, "train.max_steps=5", "train.global_batch_size=16",
                                f"parallel.zero_stage={stage}", f"run_dir={run_dir}"), launcher="none")
        assert ("resharded resume: 2 tensors, their Adam moments (step 3) and the lr schedule restored and "
                "verified") in proc.stdout
        assert "micro batch 8 x accum 2 x 1 ranks = 16 per step" in proc.stdout
        metrics = read_metrics(run_dir)
        assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
        assert metrics[3]["lr"] == pytest.approx(6.04e-4)  # the schedule continues, not restarts
        losses[stage] = [m["loss"] for m in metrics[3:]]
    # ZeRO-2 and ZeRO-3 on one rank start from the same weights, moments and data: same losses.
    assert losses[3] == pytest.approx(losses[2], rel=1e-6)


def test_resume_one_rank_on_two(tiny_assets, run_train, tmp_path):
    run_dir = str(tmp_path / "run")
    run_train(common(tiny_assets, "train.max_steps=4", "train.stop_at_step=2", "train.global_batch_size=16",
                     f"run_dir={run_dir}"), launcher="none")
    proc = run_train(common(tiny_assets, "train.max_steps=4", "train.global_batch_size=16", f"run_dir={run_dir}"),
                     launcher="torchrun")
    assert "resharded resume" in proc.stdout and "verified" in proc.stdout
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_checkpoint_for_another_llm_width_is_refused_before_training(tiny_assets, run_train, tmp_path):
    from mgpt4_dist.assets import build_tiny_llm

    run_dir = str(tmp_path / "run")
    run_train(common(tiny_assets, "train.max_steps=1", f"run_dir={run_dir}"), launcher="none")
    wide = build_tiny_llm(str(tmp_path / "wide_llm"), tiny_assets["llm_path"], hidden_size=96, num_heads=4)
    proc = run_train(common(tiny_assets, "train.max_steps=2", f"run_dir={run_dir}", f"model.llm_path={wide}"),
                     launcher="none", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "hidden size 64, the config has 96" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == [1]  # nothing trained
