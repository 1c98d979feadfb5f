"""Every engine trains the same: ZeRO 0/1/2/3, ZeRO-3 + offload and FSDP2 on 2 gloo processes.

One launch per configuration on the tiny model and the same (seeded, resampled) batch sequence.

Tolerances. fp32: losses agree to 1e-4 relative and the final llama_proj to 1e-5 absolute. The
engines run the same fp32 arithmetic and differ only in how gradients are reduced (allreduce vs
reduce-scatter, flat buffers vs per-tensor, bucket order), i.e. in the summation order of two
fp32 addends per element (~1e-7 relative); Adam divides by sqrt(v) and can amplify that on
near-zero gradient elements, which stays far below 1e-5 on weights of size ~0.1 over 6 steps.
bf16: a bf16 mantissa has 8 bits (relative step 2**-8 = 0.4 %); ZeRO (bf16 module, fp32 master in
the optimizer) and FSDP (bf16 compute from fp32 sharded master, fp32 reduce) round at different
places, so the loss is allowed 2 % relative over 2 steps.
"""
import json
import os

import pytest
import torch

from helpers import TINY_STAGE1, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

FP32_CONFIGS = {
    "zero0": ["parallel.zero_stage=0"],
    "zero1": ["parallel.zero_stage=1"],
    "zero2": ["parallel.zero_stage=2"],
    "zero3": ["parallel.zero_stage=3"],
    "zero3_offload": ["parallel.zero_stage=3", "parallel.offload=optimizer+params"],
    "fsdp": ["parallel.backend=fsdp"],
}
STEPS = 6
# Adam moments across engines: the same gradients up to summation order. Measured after 2 steps on 2
# ranks, ZeRO-1 vs ZeRO-3 (+offload): |diff| <= 3e-9 on exp_avg (median magnitude 5e-4) and <= 6e-11
# on exp_avg_sq (median 3e-8); these floors sit well below the typical value, so moments that are
# zero, swapped, or of another parameter fail.
MOMENT_ATOL = {"exp_avg": 1e-7, "exp_avg_sq": 1e-10}


def common(tiny_assets, run_dir, steps=STEPS, micro=2):
    return ["--config", TINY_STAGE1, *tiny_assets["overrides"], f"run_dir={run_dir}", f"train.max_steps={steps}",
            "train.log_every=1", f"train.micro_batch_size={micro}", "optim.lr=3e-3",
            "optim.warmup_steps=2", "checkpoint.every_steps=100"]


def engine_reference(run_dir, name, steps):
    """The final fp32 weights, and where the engine's own files hold them plainly the Adam moments,
    read with each engine's own tools: independent of our trainable_state.safetensors."""
    tag = f"step_{steps:08d}"
    root = os.path.join(run_dir, "checkpoints")
    if name == "zero0":  # no ZeRO partitions: the module states hold the fp32 weights and AdamW's state
        # Our own DeepSpeed output (it pickles its config objects), not a user-supplied file.
        states = torch.load(os.path.join(root, tag, "mp_rank_00_model_states.pt"), weights_only=False)
        weights = {k: v.float() for k, v in states["module"].items()}
        # AdamW numbers its state by position over the param groups: llama_proj.weight (decayed),
        # then llama_proj.bias (no decay).
        state = states["optimizer"]["state"]
        moments = {kind: {"llama_proj.weight": state[0][kind], "llama_proj.bias": state[1][kind]}
                   for kind in ("exp_avg", "exp_avg_sq")}
        return weights, moments
    if name == "fsdp":  # DCP's own converter gathers every rank's shards into one file
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        out = os.path.join(run_dir, "dcp_gathered.pt")
        dcp_to_torch_save(os.path.join(root, tag), out)
        full = torch.load(out, weights_only=True)
        moments = {kind: {n: s[kind] for n, s in full["optim"]["state"].items()} for kind in ("exp_avg", "exp_avg_sq")}
        return full["model"], moments
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(root, tag).items()}, None


@pytest.fixture(scope="module")
def fp32_runs(tiny_assets, run_train, tmp_path_factory):
    runs = {}
    for name, extra in FP32_CONFIGS.items():
        run_dir = str(tmp_path_factory.mktemp(name))
        report = os.path.join(run_dir, "engine_report")
        run_train(common(tiny_assets, run_dir) + extra, launcher="torchrun", env={"MGPT4_ENGINE_REPORT": report})
        weights, moments = engine_reference(run_dir, name, STEPS)
        runs[name] = {
            "run_dir": run_dir,
            "losses": [m["loss"] for m in read_metrics(run_dir)],
            "weights": weights,
            "moments": moments,
            "param_bytes": [json.load(open(os.path.join(report, f"rank{r}.json")))["param_bytes"] for r in range(2)],
        }
    return runs


@pytest.mark.parametrize("name", [n for n in FP32_CONFIGS if n != "zero0"])
def test_fp32_engines_match_zero0(fp32_runs, name):
    ref, got = fp32_runs["zero0"], fp32_runs[name]
    assert len(got["losses"]) == STEPS
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert sorted(got["weights"]) == ["llama_proj.bias", "llama_proj.weight"]
    for key, value in ref["weights"].items():
        torch.testing.assert_close(got["weights"][key], value, rtol=0, atol=1e-5, msg=f"{name}: {key}")
    # llama_proj really moved (the comparison is not between two untouched initialisations)
    assert ref["losses"][-1] != ref["losses"][0]


@pytest.mark.parametrize("name", list(FP32_CONFIGS))
def test_every_engine_consolidates_exports_and_loads_as_proj_checkpoint(fp32_runs, name, tmp_path):
    """The trainable state every engine writes (ZeRO-0 included) holds what the engine's own tools read,
    and mgpt4-consolidate, mgpt4-export and model.proj_checkpoint give exactly those weights."""
    from safetensors.torch import load_file

    from mgpt4_dist.cli import consolidate as consolidate_cli
    from mgpt4_dist.cli import export as export_cli
    from mgpt4_dist.checkpoint.state import read_proj_source, read_trainable_state
    from mgpt4_dist.models.weights import load_proj_checkpoint

    run, run_dir = fp32_runs[name], fp32_runs[name]["run_dir"]
    saved = read_trainable_state(run_dir)
    assert saved.names() == ["llama_proj.weight", "llama_proj.bias"]
    want = run["weights"]
    for key, value in saved.tensors("fp32").items():
        assert value.dtype == torch.float32 and torch.equal(value, want[key]), (name, key)
    for kind, tensors in (run["moments"] or {}).items():  # where the engine's own files hold them plainly
        for key, value in saved.tensors(kind).items():
            assert torch.equal(value, tensors[key].float()), (name, kind, key)
    # The engines took the same steps: the same Adam step, schedule and counters, and moments that agree
    # as the weights do (the same gradients up to summation order; see the module docstring).
    ref = read_trainable_state(fp32_runs["zero0"]["run_dir"])
    assert saved.adam_step == ref.adam_step == STEPS
    assert saved.lr_scheduler == ref.lr_scheduler and saved.lr_scheduler["last_epoch"] == STEPS
    assert (saved.counters()["global_steps"], saved.counters()["skipped_steps"]) == (STEPS, 0)
    for kind in ("exp_avg", "exp_avg_sq"):
        got, expected = saved.tensors(kind), ref.tensors(kind)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=MOMENT_ATOL[kind],
                                       msg=f"{name}: {kind} of {key}")

    out, pth = str(tmp_path / "consolidated"), str(tmp_path / "minigpt4.pth")
    assert consolidate_cli.main([os.path.join(run_dir, "checkpoints", "latest"), "--out", out]) == 0
    assert export_cli.main([run_dir, "--format", "minigpt4", "--out", pth]) == 0
    consolidated, exported = load_file(os.path.join(out, "model.safetensors")), torch.load(pth, weights_only=True)
    for key, value in want.items():
        assert torch.equal(consolidated[key], value) and torch.equal(exported["model"][key], value), (name, key)
    for source in (run_dir, out):  # model.proj_checkpoint: a run folder, a consolidated folder
        proj = torch.nn.Linear(*reversed(want["llama_proj.weight"].shape))
        load_proj_checkpoint(proj, source, tensors=read_proj_source(source))
        assert torch.equal(proj.weight.data, want["llama_proj.weight"]) and torch.equal(proj.bias.data,
                                                                                      want["llama_proj.bias"])


@pytest.mark.parametrize("name", ["zero3", "zero3_offload", "fsdp"])
def test_sharded_engines_hold_half_the_parameters(fp32_runs, name):
    full = fp32_runs["zero0"]["param_bytes"][0]
    for rank_bytes in fp32_runs[name]["param_bytes"]:
        # 1/N plus the small unsharded remainder (ZeRO-3 persistence threshold, padding)
        assert 0.45 * full <= rank_bytes <= 0.56 * full, (name, rank_bytes, full)


def test_bf16_zero2_and_fsdp_agree(tiny_assets, run_train, tmp_path):
    losses = {}
    for name, extra in {"zero2": [], "fsdp": ["parallel.backend=fsdp"]}.items():
        run_dir = str(tmp_path / name)
        run_train(common(tiny_assets, run_dir, steps=2, micro=1) + extra + ["train.precision=bf16"], launcher="torchrun")
        losses[name] = [m["loss"] for m in read_metrics(run_dir)]
    assert losses["fsdp"] == pytest.approx(losses["zero2"], rel=2e-2)
