"""Export from a training checkpoint's trainable state, without processes: `consolidate()` and
`model.proj_checkpoint` on a run folder. The CLIs on real runs: tests/e2e/test_consolidate_cli.py,
tests/e2e/test_export_cli.py."""
import os

import pytest
import torch

from mgpt4_dist.checkpoint.state import TRAINABLE_STATE
from mgpt4_dist.errors import CheckpointMismatchError

from helpers import PROJ_NAMES, make_full_state, write_step_folder


def test_consolidate_and_proj_checkpoint_read_the_trainable_state(tmp_path):
    from safetensors.torch import load_file

    from mgpt4_dist.config import load_config, save_config
    from mgpt4_dist.checkpoint.state import read_proj_source
    from mgpt4_dist.export.consolidate import consolidate
    from mgpt4_dist.models.weights import load_proj_checkpoint

    state = make_full_state()
    step_dir = write_step_folder(tmp_path / "run", state=state)
    save_config(load_config(None, []), os.path.join(step_dir, "config.yaml"))
    out = str(tmp_path / "out")
    result = consolidate(str(tmp_path / "run"), out)
    assert result["step_dir"] == step_dir and result["tensors"] == {"llama_proj.weight": [7, 5], "llama_proj.bias": [7]}
    got = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(got[n], state.weights[n]) for n in PROJ_NAMES)
    proj = torch.nn.Linear(5, 7)
    load_proj_checkpoint(proj, str(tmp_path / "run"), tensors=read_proj_source(str(tmp_path / "run")))
    assert torch.equal(proj.weight.data, state.weights["llama_proj.weight"])
    os.remove(os.path.join(step_dir, TRAINABLE_STATE))
    with pytest.raises(CheckpointMismatchError, match=f"no {TRAINABLE_STATE}"):
        load_proj_checkpoint(proj, step_dir, tensors=read_proj_source(step_dir))
