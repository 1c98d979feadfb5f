"""`mgpt4-consolidate` on real ZeRO-2, ZeRO-3 and FSDP2 runs: equal to DeepSpeed's zero_to_fp32 (resp.
DCP's dcp_to_torch_save), which still works on the step folders, loadable by the inference loader and
by the original-format readers; `--full` stands alone; a step folder of an older version is one clear
error. (Every engine, ZeRO-0 included, in-process: tests/distributed/test_engines.py.)"""
import json
import os
import subprocess

import pytest
import torch

from helpers import BIN, TINY_STAGE1

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero_run(request, tiny_assets, run_train, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp(f"zero{request.param}") / "run")
    run_train(["--config", TINY_STAGE1, *tiny_assets["overrides"], f"run_dir={run_dir}", "train.max_steps=2",
               f"parallel.zero_stage={request.param}", "optim.lr=3e-3"], launcher="torchrun")
    return run_dir


def consolidate(*args):
    return subprocess.run([os.path.join(BIN, "mgpt4-consolidate"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_consolidated_tensors_equal_zero_to_fp32(zero_run, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = str(tmp_path / "out")
    proc = consolidate(os.path.join(zero_run, "checkpoints", "latest"), "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["config.json", "config.yaml", "minigpt4.pth", "model.safetensors"]
    ref = get_fp32_state_dict_from_zero_checkpoint(os.path.join(zero_run, "checkpoints"),
                                                   exclude_frozen_parameters=True)
    got = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(got) == ["llama_proj.bias", "llama_proj.weight"]
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, ref[name]), name
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["mgpt4_config"])["step"] == 2
    original = torch.load(os.path.join(out, "minigpt4.pth"), weights_only=True)
    assert list(original) == ["model"] and all(torch.equal(original["model"][k], got[k]) for k in got)
    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["conversation"] == "vicuna0" and conf["model"]["llm_path"]
    # model.proj_checkpoint (stage 2 from stage 1) takes the run, a step folder or the consolidated one.
    from mgpt4_dist.checkpoint.state import read_proj_source
    from mgpt4_dist.models.weights import load_proj_checkpoint

    for source in (zero_run, os.path.join(zero_run, "checkpoints", "step_00000002"), out):
        proj = torch.nn.Linear(*reversed(ref["llama_proj.weight"].shape))
        load_proj_checkpoint(proj, source, tensors=read_proj_source(source))
        assert torch.equal(proj.weight.data, ref["llama_proj.weight"]) and torch.equal(proj.bias.data, ref["llama_proj.bias"])


def test_full_folder_loads_alone_and_matches(zero_run, tmp_path):
    from mgpt4_dist.inference import load_model

    if "zero3" in zero_run:
        pytest.skip("the frozen part does not depend on the ZeRO stage; checked once on ZeRO-2")
    slim, full = str(tmp_path / "slim"), str(tmp_path / "full")
    assert consolidate(zero_run, "--out", slim).returncode == 0
    proc = consolidate(zero_run, "--out", full, "--full", "--shard-size-gb", "0.0002")
    assert proc.returncode == 0, proc.stderr
    index = json.load(open(os.path.join(full, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert any(k.startswith("llm.model.layers.") for k in index["weight_map"])
    a = load_model(slim, device="cpu")
    b = load_model(full, device="cpu", llm_path=None)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    torch.manual_seed(0)
    image = torch.randn(1, 3, 224, 224)
    assert torch.equal(a.model.encode_image(image), b.model.encode_image(image))


def test_fsdp_checkpoint_consolidates_to_the_gathered_weights(tiny_assets, run_train, tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run_dir = str(tmp_path / "run")
    run_train(["--config", TINY_STAGE1, *tiny_assets["overrides"], f"run_dir={run_dir}", "train.max_steps=2",
               "parallel.backend=fsdp", "optim.lr=3e-3"], launcher="torchrun")
    out = str(tmp_path / "out")
    proc = consolidate(run_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["config.json", "config.yaml", "minigpt4.pth", "model.safetensors"]
    # DCP's own converter gathers every rank's shards into one file: the independent reference.
    step_dir = os.path.join(run_dir, "checkpoints", "step_00000002")
    dcp_to_torch_save(step_dir, str(tmp_path / "ref.pt"))
    ref = torch.load(str(tmp_path / "ref.pt"), weights_only=True)["model"]
    got = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(got) == sorted(ref) == ["llama_proj.bias", "llama_proj.weight"]
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, ref[name]), name
    original = torch.load(os.path.join(out, "minigpt4.pth"), weights_only=True)
    assert all(torch.equal(original["model"][k], got[k]) for k in got)
    assert json.load(open(os.path.join(out, "config.json")))["step"] == 2


def test_a_step_folder_without_trainable_state_is_one_clear_error(zero_run, tmp_path):
    """As an older mgpt4_dist wrote them: consolidation and export name the file and how to get it."""
    import shutil

    if "zero3" in zero_run:
        pytest.skip("the error does not depend on the ZeRO stage; checked once on ZeRO-2")
    run_dir = str(tmp_path / "old_run")
    shutil.copytree(zero_run, run_dir)
    step_dir = os.path.join(run_dir, "checkpoints", "step_00000002")
    os.remove(os.path.join(step_dir, "trainable_state.safetensors"))
    export = subprocess.run([os.path.join(BIN, "mgpt4-export"), run_dir, "--out", str(tmp_path / "x.pth")],
                            capture_output=True, text=True, timeout=300)
    for proc, tool in ((consolidate(run_dir, "--out", str(tmp_path / "o")), "mgpt4-consolidate"), (export, "mgpt4-export")):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{tool}: error: {step_dir}: no trainable_state.safetensors" in proc.stderr
        assert "parallel.backend=deepspeed parallel.zero_stage=2 on 2 ranks" in proc.stderr


def test_bad_checkpoint_path_is_a_clear_error(tmp_path):
    proc = consolidate(str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no such checkpoint" in proc.stderr and "Traceback" not in proc.stderr
