"""The engine-neutral trainable state of a step folder (`trainable_state.safetensors`), without
processes: exact round trip and the refusals (a folder without the file, a damaged or foreign file).
Consolidation from it: tests/unit/test_export.py. Real checkpoints of every engine, checked against
each engine's own tools: tests/distributed/test_engines.py."""
import json
import os

import pytest
import torch

from mgpt4_dist.checkpoint.layout import resolve_step_dir
from mgpt4_dist.checkpoint.state import (TRAINABLE_STATE, TrainableState, read_trainable_state,
                                         write_trainable_state)
from mgpt4_dist.errors import CheckpointMismatchError

from helpers import PROJ_NAMES, make_full_state, write_step_folder

def test_trainable_state_round_trips_exactly(tmp_path):
    state = make_full_state(loss_scale=512.0)
    step_dir = write_step_folder(tmp_path, state=state)
    assert sorted(os.listdir(step_dir)) == ["meta.json", TRAINABLE_STATE]  # the temp file was renamed
    for path in (str(tmp_path), os.path.join(str(tmp_path), "checkpoints", "latest"), step_dir):
        saved = read_trainable_state(path)
        assert saved.step_dir == step_dir and saved.names() == PROJ_NAMES
    assert saved.shapes() == {"llama_proj.weight": torch.Size([7, 5]), "llama_proj.bias": torch.Size([7])}
    back = saved.full_state()
    assert (back.adam_step, back.scheduler_state, back.counters) == (5, state.scheduler_state, state.counters)
    for name in PROJ_NAMES:
        assert back.weights[name].dtype == torch.float32 and torch.equal(back.weights[name], state.weights[name])
        for kind in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(back.moments[kind][name], state.moments[kind][name])
    # The same file for every engine: plain safetensors, "KIND/NAME" keys, JSON metadata.
    from safetensors import safe_open

    with safe_open(os.path.join(step_dir, TRAINABLE_STATE), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"{k}/{n}" for k in ("fp32", "exp_avg", "exp_avg_sq") for n in PROJ_NAMES)
        assert f.metadata()["format"] == "mgpt4_dist.trainable_state" and json.loads(f.metadata()["adam_step"]) == 5


def test_a_step_folder_without_the_file_says_to_resume_it_on_its_engine(tmp_path):
    step_dir = write_step_folder(tmp_path, meta={"step": 6, "world_size": 2, "backend": "deepspeed", "zero_stage": 2})
    with pytest.raises(CheckpointMismatchError) as e:
        read_trainable_state(str(tmp_path))
    message = str(e.value)
    assert f"{step_dir}: no {TRAINABLE_STATE}" in message
    assert "parallel.backend=deepspeed parallel.zero_stage=2 on 2 ranks" in message
    assert f"checkpoint.resume={step_dir}" in message
    with pytest.raises(CheckpointMismatchError, match="not a step folder of an mgpt4-train run"):
        TrainableState(str(tmp_path))  # not even a step folder


def test_a_damaged_or_foreign_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    step_dir = write_step_folder(tmp_path, state=make_full_state())
    path = os.path.join(step_dir, TRAINABLE_STATE)
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(CheckpointMismatchError, match="not a readable safetensors file"):
        TrainableState(step_dir)
    save_file({"llama_proj.weight": torch.zeros(2)}, path)  # a weight file, not our state
    with pytest.raises(CheckpointMismatchError, match="not an mgpt4_dist trainable state"):
        TrainableState(step_dir)
    write_trainable_state(make_full_state(), path)
    with pytest.raises(ValueError, match="choose one of fp32, exp_avg, exp_avg_sq"):
        TrainableState(step_dir).tensors("grad")


def test_resolve_step_dir_and_a_missing_folder(tmp_path):
    step_dir = write_step_folder(tmp_path, state=make_full_state())
    assert resolve_step_dir(os.path.join(str(tmp_path), "checkpoints")) == step_dir
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resolve_step_dir(str(tmp_path / "nope"))
