"""Checkpoint bookkeeping without processes: RNG state, pruning, resume paths, the model-fit check.
(Data-position rescaling on resume: tests/unit/test_data_rescale.py.)"""
import os
import random

import numpy as np
import pytest
import torch

from mgpt4_dist.checkpoint.layout import ResumePoint, find_resume_point, prune, tag_step, write_latest
from mgpt4_dist.checkpoint.manager import check_model_fits
from mgpt4_dist.checkpoint.state import rng_state, set_rng_state
from mgpt4_dist.config import load_config
from mgpt4_dist.errors import CheckpointMismatchError


def test_rng_state_covers_python_numpy_torch_and_round_trips(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    assert {"python", "numpy", "torch"} <= set(state) and ("cuda" in state) == torch.cuda.is_available()
    path = str(tmp_path / "s.pt")
    torch.save(state, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True))  # weights-only loadable
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_prune_keeps_last_and_removes_stale_temp_folders(tmp_path):
    root = str(tmp_path)
    for step in (1, 2, 3, 4):
        os.makedirs(os.path.join(root, f"step_{step:08d}"))
    os.makedirs(os.path.join(root, ".tmp-step_00000005"))  # left by a save killed mid-way
    write_latest(root, "step_00000004")
    prune(root, keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000004"]


def test_find_resume_point_accepts_step_checkpoints_and_run_folders(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000007").mkdir(parents=True)
    write_latest(str(run / "checkpoints"), "step_00000007")
    for target in (run, run / "checkpoints", run / "checkpoints" / "step_00000007"):
        cfg = load_config(None, [f"checkpoint.resume={target}", f"run_dir={tmp_path / 'other'}"])
        assert find_resume_point(cfg).path == str(run / "checkpoints" / "step_00000007")
    cfg = load_config(None, [f"run_dir={tmp_path / 'fresh'}"])
    assert find_resume_point(cfg) is None  # auto, nothing there yet


class _SavedShapes:
    """A checkpoint reader reduced to what check_model_fits asks of it."""

    def __init__(self, shapes):
        self._shapes = shapes

    def shapes(self):
        return {k: torch.Size(v) for k, v in self._shapes.items()}


@pytest.mark.parametrize("saved,message", [
    ({"llama_proj.weight": (64, 64 * 4), "llama_proj.bias": (64,)}, "another visual feature width"),
    ({"llama_proj.weight": (128, 64), "llama_proj.bias": (128,)}, "LLM of hidden size 128, the config has 64"),
    ({"llama_proj.weight": (64, 64)}, r"missing \['llama_proj.bias'\]"),
])
def test_checkpoint_of_another_variant_or_width_is_refused(saved, message):
    proj = torch.nn.Linear(64, 64)  # Q-Former width 64 -> LLM width 64, as the tiny config
    wanted = {f"llama_proj.{n}": tuple(p.shape) for n, p in proj.named_parameters()}  # Engine.trainable_shapes()
    point = ResumePoint("/runs/x/checkpoints", "step_00000002")
    with pytest.raises(CheckpointMismatchError, match=message):
        check_model_fits(point, wanted, reader=_SavedShapes(saved))
    check_model_fits(point, wanted, reader=_SavedShapes({"llama_proj.weight": (64, 64), "llama_proj.bias": (64,)}))


def test_tags_name_their_step():
    assert ResumePoint("/r/checkpoints", "step_00000042").step == tag_step("step_00000042") == 42
    with pytest.raises(ValueError, match="not a step_NNNNNNNN"):
        tag_step("step_42")
