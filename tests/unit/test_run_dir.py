"""run_dir.check_run_dir: another run is refused, a restart of the same run before its first checkpoint is not."""
import os

import pytest

from mgpt4_dist.config import load_config, save_config
from mgpt4_dist.checkpoint.run_dir import RunDirError, check_run_dir

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "mgpt4_dist", "configs", "tiny_stage1.yaml")


def crashed_attempt(run_dir, cfg):
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1, "loss": 6.9}\n{"step": 2, "loss": 6.8}\n')


def test_the_same_run_restarted_before_its_first_checkpoint_starts_again(tmp_path):
    cfg = load_config(TINY, [f"run_dir={tmp_path}"])
    crashed_attempt(str(tmp_path), cfg)
    check_run_dir(cfg, resuming=False, rank=0)  # e.g. a Slurm crash restart: allowed
    other = load_config(TINY, [f"run_dir={tmp_path}", "train.seed=7"])
    with pytest.raises(RunDirError, match="holds another run"):
        check_run_dir(other, resuming=False, rank=0)
    never = load_config(TINY, [f"run_dir={tmp_path}", "checkpoint.resume=never"])
    with pytest.raises(RunDirError, match="resume=never would start a second run"):
        check_run_dir(never, resuming=False, rank=0)
