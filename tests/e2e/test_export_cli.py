"""`mgpt4-export`: the original demo's {'model': ...} file and safetensors with the config, round trip."""
import json
import os
import subprocess

import pytest
import torch

from helpers import BIN, TINY_STAGE1

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def trained_run(tiny_trained_run):
    return tiny_trained_run


def export(*args):
    return subprocess.run([os.path.join(BIN, "mgpt4-export"), *args], capture_output=True, text=True, timeout=300)


def test_export_round_trip_both_formats(trained_run, tiny_assets, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mgpt4_dist.config import load_config
    from mgpt4_dist.models.minigpt4 import build_minigpt4

    pth, st = str(tmp_path / "minigpt4.pth"), str(tmp_path / "proj.safetensors")
    proc = export(trained_run, "--format", "minigpt4", "--out", pth)
    assert proc.returncode == 0, proc.stderr
    assert export(os.path.join(trained_run, "checkpoints", "latest"), "--format", "safetensors", "--out", st).returncode == 0
    # DeepSpeed's own tool on its own files: the reference, independent of our trainable state.
    expected = get_fp32_state_dict_from_zero_checkpoint(os.path.join(trained_run, "checkpoints"),
                                                        exclude_frozen_parameters=True)

    original = torch.load(pth, weights_only=True)  # what the original demo.py reads
    assert list(original) == ["model"] and sorted(original["model"]) == ["llama_proj.bias", "llama_proj.weight"]
    tensors = load_file(st)
    with safe_open(st, framework="pt") as f:
        conf = json.loads(f.metadata()["mgpt4_config"])
    assert conf["model"]["qformer"]["hidden_size"] == 64 and conf["step"] == 2
    for name in expected:
        assert original["model"][name].dtype == torch.float32
        assert torch.equal(original["model"][name], expected[name]) and torch.equal(tensors[name], expected[name])

    # Both load back as model.proj_checkpoint (stage 2 from a stage-1 export, inference).
    for path in (pth, st):
        cfg = load_config(TINY_STAGE1, [*tiny_assets["overrides"], f"model.proj_checkpoint={path}"])
        model = build_minigpt4(cfg.model, seed=1)
        assert torch.equal(model.llama_proj.weight, expected["llama_proj.weight"])


def test_export_of_a_non_checkpoint_fails_clearly(tmp_path):
    proc = export(str(tmp_path), "--out", str(tmp_path / "x.pth"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error" in proc.stderr
