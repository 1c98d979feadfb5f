"""Real 2-process DeepSpeed training on gloo: the loss falls, and a checkpoint holds the trainable state only.
(Resume: tests/distributed/test_resume.py.)"""
import glob
import os

import pytest
import torch

from helpers import TINY_STAGE1, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_zero2_fp32_loss_falls_on_fixed_data(tiny_assets, run_train, tmp_path):
    run_dir = str(tmp_path / "run")
    run_train(["--config", TINY_STAGE1, *tiny_assets["overrides"], f"run_dir={run_dir}", "train.max_steps=30",
               "train.log_every=1", "checkpoint.every_steps=100", "optim.lr=3e-3", "optim.warmup_steps=3"])
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.08, f"loss did not fall: first {first:.3f}, last {last:.3f}"


def test_checkpoint_holds_trainable_state_only(tiny_assets, run_train, tmp_path):
    run_dir = str(tmp_path / "run")
    run_train(["--config", TINY_STAGE1, *tiny_assets["overrides"], f"run_dir={run_dir}", "train.max_steps=2",
               "train.precision=bf16", "train.micro_batch_size=2"])
    ckpt = os.path.join(run_dir, "checkpoints", "step_00000002")
    # Our own DeepSpeed output (it pickles its config objects), not a user-supplied file.
    states = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    assert sorted(states["module"]) == ["llama_proj.bias", "llama_proj.weight"]
    assert states["module"]["llama_proj.weight"].dtype == torch.bfloat16
    assert len(glob.glob(os.path.join(ckpt, "*optim_states.pt"))) == 2  # ZeRO-2: one optimizer shard per rank
    for rank in range(2):
        trainer = torch.load(os.path.join(ckpt, f"trainer_state_rank{rank}.pt"), weights_only=True)
        assert trainer["step"] == 2 and trainer["data"]["batches"] == 2 and "rng" in trainer
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "step_00000002"
