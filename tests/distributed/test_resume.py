"""Checkpoint lifecycle with real processes, every resume test in one place: stop and resume exactly on
the same engine (DeepSpeed, FSDP2), kill -9 mid-save, resume on another world size, ZeRO stage or
backend (DeepSpeed <-> FSDP2), and a checkpoint for another model refused before training."""
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from helpers import BIN, REPO, TINY_STAGE1, free_port, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def common(tiny_assets, *extra):
    return ["--config", TINY_STAGE1, *tiny_assets["overrides"], "train.log_every=1", *extra]


def step_folders(run_dir):
    """Checkpoint folders (DeepSpeed also drops its zero_to_fp32.py recovery script beside them)."""
    return sorted(n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith("step_"))


def last_loss_per_step(run_dir):
    # A killed run may have logged steps that the resumed run repeats: the last record wins.
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def test_deepspeed_stop_and_resume_matches_uninterrupted(tiny_assets, run_train, tmp_path):
    common = ["--config", TINY_STAGE1, *tiny_assets["overrides"], "train.max_steps=8", "train.log_every=1",
              "checkpoint.every_steps=3", "checkpoint.keep_last=2"]
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    run_train(common + [f"run_dir={straight}"], launcher="torchrun")
    run_train(common + [f"run_dir={interrupted}", "train.stop_at_step=5"], launcher="torchrun")
    assert step_folders(interrupted) == ["step_00000003", "step_00000005"]
    proc = run_train(common + [f"run_dir={interrupted}"], launcher="torchrun")
    assert "resumed from" in proc.stdout

    ref = {m["step"]: m["loss"] for m in read_metrics(straight)}
    got = read_metrics(interrupted)
    assert [m["step"] for m in got] == list(range(1, 9))  # appended, no step repeated or lost
    for m in got:  # fp32, same engine and world size: bit for bit
        assert m["loss"] == ref[m["step"]], f"step {m['step']}"
    # keep_last=2 pruned the oldest; the last step always gets a checkpoint
    assert step_folders(interrupted) == ["step_00000006", "step_00000008"]
    assert open(os.path.join(interrupted, "checkpoints", "latest")).read() == "step_00000008"


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
        # The whole job, as Slurm's kill of a step's cgroup: torchrun starts each worker in its own
        # session, so the launcher's process group alone would leave both ranks running.
        job = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
        for pid in job:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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


def warmup_lr(step: int) -> float:
    """The tiny config's lr at `step` of its linear warmup (steps 1..warmup_steps)."""
    from mgpt4_dist.config import load_config

    optim = load_config(TINY_STAGE1).optim
    return optim.warmup_start_lr + (optim.lr - optim.warmup_start_lr) * (step - 1) / optim.warmup_steps


RESHARDED = "resharded resume: 2 tensors, their Adam moments (step 3) and the lr schedule restored and verified"


@pytest.fixture(scope="module")
def fsdp_two_rank_checkpoint(tiny_assets, run_train, tmp_path_factory):
    """`two_rank_checkpoint` made by the FSDP2 engine."""
    run_dir = str(tmp_path_factory.mktemp("fsdp_two_rank") / "run")
    run_train(common(tiny_assets, "train.max_steps=5", "train.stop_at_step=3", "train.global_batch_size=16",
                     "parallel.backend=fsdp", f"run_dir={run_dir}"), launcher="torchrun")
    return run_dir


@pytest.fixture(scope="module")
def resume_on_one_rank(tiny_assets, run_train, tmp_path_factory):
    """(checkpointed run, ZeRO stage) -> (stdout, metrics, run dir) of its resume on one DeepSpeed rank;
    each combination runs once per module, whichever test asks first."""
    done = {}

    def resume(src, stage):
        if (src, stage) not in done:
            run_dir = resume_copy(src, str(tmp_path_factory.mktemp(f"one_rank_zero{stage}") / "run"))
            # Another world size renumbers the data streams: not an exact resume, so opted in to.
            proc = run_train(common(tiny_assets, "train.max_steps=5", "train.global_batch_size=16",
                                    f"parallel.zero_stage={stage}", f"run_dir={run_dir}",
                                    "checkpoint.allow_changes=true"), launcher="none")
            done[src, stage] = proc.stdout, read_metrics(run_dir), run_dir
        return done[src, stage]

    return resume


def final_weights(run_dir):
    from mgpt4_dist.checkpoint.state import read_trainable_state

    return read_trainable_state(run_dir).tensors("fp32")


def test_resume_two_ranks_on_one_keeps_state_and_global_batch(two_rank_checkpoint, resume_on_one_rank):
    losses = {}
    for stage in (2, 3, 0):  # ZeRO-0: AdamW's state on whole master tensors, no partitions
        stdout, metrics, _ = resume_on_one_rank(two_rank_checkpoint, stage)
        assert RESHARDED in stdout
        assert "micro batch 8 x accum 2 x 1 ranks = 16 per step" in stdout
        assert "gradient accumulation 1 -> 2; world size 2 -> 1 (the data streams are renumbered" in stdout
        assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
        assert metrics[3]["lr"] == pytest.approx(warmup_lr(4))  # the schedule continues, not restarts
        losses[stage] = [m["loss"] for m in metrics[3:]]
    # ZeRO-0, 2 and 3 on one rank start from the same weights, moments and data: same losses.
    assert losses[3] == pytest.approx(losses[2], rel=1e-6)
    assert losses[0] == pytest.approx(losses[2], rel=1e-6)


def test_deepspeed_checkpoint_resumes_on_fsdp_like_an_uninterrupted_run(two_rank_checkpoint, tiny_assets,
                                                                         run_train, tmp_path):
    """ZeRO-2 -> FSDP2 on the same 2 ranks: the data streams are the same, so every rank continues its
    own data position and RNG, and steps 4-5 are those of a ZeRO-2 run that never stopped.

    Tolerances: the state crosses exactly (verified in the run); from there the engines differ only
    in the order gradients are summed over 2 ranks (~1e-7 relative per step, see test_engines.py),
    so 1e-5 relative on the loss and the 1e-5 absolute of test_engines.py on the final weights. Both
    catch a resume that drops the Adam moments (measured: step-5 loss off by 2e-4 relative, weights
    by 1.8e-3)."""
    straight = str(tmp_path / "straight")
    run_train(common(tiny_assets, "train.max_steps=5", "train.global_batch_size=16", f"run_dir={straight}"),
              launcher="torchrun")
    run_dir = resume_copy(two_rank_checkpoint, str(tmp_path / "on_fsdp"))
    proc = run_train(common(tiny_assets, "train.max_steps=5", "train.global_batch_size=16", "parallel.backend=fsdp",
                            f"run_dir={run_dir}"), launcher="torchrun")
    assert "(deepspeed ZeRO-2), resuming on 2 ranks (fsdp)" in proc.stdout
    assert RESHARDED in proc.stdout
    metrics, ref = read_metrics(run_dir), read_metrics(straight)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [m["lr"] for m in metrics] == pytest.approx([m["lr"] for m in ref])  # the schedule continues
    assert [m["loss"] for m in metrics[3:]] == pytest.approx([m["loss"] for m in ref[3:]], rel=1e-5)
    got, want = final_weights(run_dir), final_weights(straight)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_fsdp_checkpoint_resumes_on_one_deepspeed_rank(fsdp_two_rank_checkpoint, two_rank_checkpoint,
                                                       resume_on_one_rank):
    """FSDP2 on 2 ranks -> DeepSpeed ZeRO-2 on 1: the FSDP reader, another world size and another engine.
    The same resume of the ZeRO-2 checkpoint is the reference (same data rescaling, same engine; the two
    checkpoints differ only by the engines' summation order): tolerances as above."""
    stdout, metrics, run_dir = resume_on_one_rank(fsdp_two_rank_checkpoint, 2)
    assert "written by 2 ranks (fsdp), resuming on 1 ranks (deepspeed ZeRO-2)" in stdout
    assert RESHARDED in stdout
    assert "micro batch 8 x accum 2 x 1 ranks = 16 per step" in stdout
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[3]["lr"] == pytest.approx(warmup_lr(4))
    _, ref, ref_dir = resume_on_one_rank(two_rank_checkpoint, 2)
    assert [m["loss"] for m in metrics[3:]] == pytest.approx([m["loss"] for m in ref[3:]], rel=1e-5)
    got, want = final_weights(run_dir), final_weights(ref_dir)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_resume_one_rank_on_two(tiny_assets, run_train, tmp_path):
    run_dir = str(tmp_path / "run")
    run_train(common(tiny_assets, "train.max_steps=4", "train.stop_at_step=2", "train.global_batch_size=16",
                     f"run_dir={run_dir}"), launcher="none")
    proc = run_train(common(tiny_assets, "train.max_steps=4", "train.global_batch_size=16", f"run_dir={run_dir}",
                            "checkpoint.allow_changes=true"), launcher="torchrun")
    assert "resharded resume" in proc.stdout and "verified" in proc.stdout
    assert "world size 1 -> 2 (the data streams are renumbered" in proc.stdout
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_checkpoint_for_another_llm_width_is_refused_before_training(tiny_assets, run_train, tmp_path):
    from mgpt4_dist.tiny.assets import build_tiny_llm

    run_dir = str(tmp_path / "run")
    run_train(common(tiny_assets, "train.max_steps=1", f"run_dir={run_dir}"), launcher="none")
    wide = build_tiny_llm(str(tmp_path / "wide_llm"), tiny_assets["llm_path"], hidden_size=96, num_heads=4)
    proc = run_train(common(tiny_assets, "train.max_steps=2", f"run_dir={run_dir}", f"model.llm_path={wide}"),
                     launcher="none", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "hidden size 64, the config has 96" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == [1]  # nothing trained


def test_fsdp_stop_and_resume_matches_uninterrupted(tiny_assets, run_train, tmp_path):
    """DCP checkpoint of llama_proj + AdamW + schedule; gradient accumulation across the resume point;
    a step folder without trainable_state.safetensors (an older version's) resumes on its own engine."""
    base = common(tiny_assets, "train.max_steps=4", "train.micro_batch_size=2", "optim.lr=3e-3",
                  "optim.warmup_steps=2", "parallel.backend=fsdp", "checkpoint.every_steps=2", "train.grad_accum_steps=2")
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    run_train(base + [f"run_dir={straight}"], launcher="torchrun")
    run_train(base + [f"run_dir={interrupted}", "train.stop_at_step=2"], launcher="torchrun")
    # As an older mgpt4_dist left it: no engine-neutral state. Same-engine resume needs only the
    # engine's own files, and its next checkpoint has the file again.
    os.remove(os.path.join(interrupted, "checkpoints", "step_00000002", "trainable_state.safetensors"))
    proc = run_train(base + [f"run_dir={interrupted}"], launcher="torchrun")
    assert "resumed from" in proc.stdout and "has no trainable_state.safetensors" in proc.stdout
    ref = [m["loss"] for m in read_metrics(straight)]
    got = [m["loss"] for m in read_metrics(interrupted)]
    assert len(got) == 4 and got == ref  # fp32, same engine and world size: bit for bit
    assert os.path.isfile(os.path.join(interrupted, "checkpoints", "step_00000004", "trainable_state.safetensors"))
