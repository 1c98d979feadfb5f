"""The engine-neutral trainable state of a step folder (`trainable_state.safetensors`) and consolidation
from it, without processes: exact round trip, the refusals (a folder without the file, a damaged or
foreign file), and `consolidate()` / `model.proj_checkpoint` on a step folder. Real checkpoints of
every engine, checked against each engine's own tools: tests/distributed/test_engines.py."""
import json
import os

import pytest
import torch

from mgpt4_dist.trainable_state import (TRAINABLE_STATE, CheckpointFormatError, FullState, TrainableState,
                                        read_trainable_state, resolve_step_dir, write_trainable_state)

NAMES = ["llama_proj.weight", "llama_proj.bias"]


def full_state(seed=0, adam_step=5, loss_scale=None):
    g = torch.Generator().manual_seed(seed)
    shapes = {"llama_proj.weight": (7, 5), "llama_proj.bias": (7,)}
    weights = {n: torch.randn(shapes[n], generator=g) for n in NAMES}
    moments = {kind: {n: torch.randn(shapes[n], generator=g).abs() for n in NAMES} for kind in ("exp_avg", "exp_avg_sq")}
    schedule = {"max_steps": 10, "base_lrs": [1e-3, 1e-3], "last_epoch": adam_step, "_last_lr": [4.2e-4, 4.2e-4]}
    counters = {"global_steps": adam_step + 1, "global_samples": 48, "skipped_steps": 1, "loss_scale": loss_scale}
    return FullState(weights, moments, adam_step, schedule, counters)


def write_step(root, step=6, meta=None, state=None):
    step_dir = os.path.join(str(root), "checkpoints", f"step_{step:08d}")
    os.makedirs(step_dir)
    with open(os.path.join(step_dir, "meta.json"), "w") as f:
        json.dump(meta or {"step": step, "world_size": 2, "backend": "deepspeed", "zero_stage": 0}, f)
    with open(os.path.join(str(root), "checkpoints", "latest"), "w") as f:
        f.write(f"step_{step:08d}")
    if state is not None:
        write_trainable_state(state, os.path.join(step_dir, TRAINABLE_STATE))
    return step_dir


def test_trainable_state_round_trips_exactly(tmp_path):
    state = full_state(loss_scale=512.0)
    step_dir = write_step(tmp_path, state=state)
    assert sorted(os.listdir(step_dir)) == ["meta.json", TRAINABLE_STATE]  # the temp file was renamed
    for path in (str(tmp_path), os.path.join(str(tmp_path), "checkpoints", "latest"), step_dir):
        saved = read_trainable_state(path)
        assert saved.step_dir == step_dir and saved.names() == NAMES
    assert saved.shapes() == {"llama_proj.weight": torch.Size([7, 5]), "llama_proj.bias": torch.Size([7])}
    back = saved.full_state()
    assert (back.adam_step, back.scheduler_state, back.counters) == (5, state.scheduler_state, state.counters)
    for name in NAMES:
        assert back.weights[name].dtype == torch.float32 and torch.equal(back.weights[name], state.weights[name])
        for kind in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(back.moments[kind][name], state.moments[kind][name])
    # The same file for every engine: plain safetensors, "KIND/NAME" keys, JSON metadata.
    from safetensors import safe_open

    with safe_open(os.path.join(step_dir, TRAINABLE_STATE), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"{k}/{n}" for k in ("fp32", "exp_avg", "exp_avg_sq") for n in NAMES)
        assert f.metadata()["format"] == "mgpt4_dist.trainable_state" and json.loads(f.metadata()["adam_step"]) == 5


def test_a_step_folder_without_the_file_says_to_resume_it_on_its_engine(tmp_path):
    step_dir = write_step(tmp_path, meta={"step": 6, "world_size": 2, "backend": "deepspeed", "zero_stage": 2})
    with pytest.raises(CheckpointFormatError) as e:
        read_trainable_state(str(tmp_path))
    message = str(e.value)
    assert f"{step_dir}: no {TRAINABLE_STATE}" in message
    assert "parallel.backend=deepspeed parallel.zero_stage=2 on 2 ranks" in message
    assert f"checkpoint.resume={step_dir}" in message
    with pytest.raises(CheckpointFormatError, match="not a step folder of an mgpt4-train run"):
        TrainableState(str(tmp_path))  # not even a step folder


def test_a_damaged_or_foreign_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    step_dir = write_step(tmp_path, state=full_state())
    path = os.path.join(step_dir, TRAINABLE_STATE)
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(CheckpointFormatError, match="not a readable safetensors file"):
        TrainableState(step_dir)
    save_file({"llama_proj.weight": torch.zeros(2)}, path)  # a weight file, not our state
    with pytest.raises(CheckpointFormatError, match="not an mgpt4_dist trainable state"):
        TrainableState(step_dir)
    write_trainable_state(full_state(), path)
    with pytest.raises(ValueError, match="choose one of fp32, exp_avg, exp_avg_sq"):
        TrainableState(step_dir).tensors("grad")


def test_resolve_step_dir_and_a_missing_folder(tmp_path):
    step_dir = write_step(tmp_path, state=full_state())
    assert resolve_step_dir(os.path.join(str(tmp_path), "checkpoints")) == step_dir
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resolve_step_dir(str(tmp_path / "nope"))


def test_consolidate_and_proj_checkpoint_read_the_trainable_state(tmp_path):
    from safetensors.torch import load_file

    from mgpt4_dist.config import load_config, save_config
    from mgpt4_dist.consolidate import consolidate
    from mgpt4_dist.models.loading import CheckpointMismatchError, load_proj_checkpoint

    state = full_state()
    step_dir = write_step(tmp_path / "run", state=state)
    save_config(load_config(None, []), os.path.join(step_dir, "config.yaml"))
    out = str(tmp_path / "out")
    result = consolidate(str(tmp_path / "run"), out)
    assert result["step_dir"] == step_dir and result["tensors"] == {"llama_proj.weight": [7, 5], "llama_proj.bias": [7]}
    got = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(got[n], state.weights[n]) for n in NAMES)
    proj = torch.nn.Linear(5, 7)
    load_proj_checkpoint(proj, str(tmp_path / "run"))
    assert torch.equal(proj.weight.data, state.weights["llama_proj.weight"])
    os.remove(os.path.join(step_dir, TRAINABLE_STATE))
    with pytest.raises(CheckpointMismatchError, match=f"no {TRAINABLE_STATE}"):
        load_proj_checkpoint(proj, step_dir)
