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


def test_activation_checkpointing_gives_the_same_gradients(tiny_assets):
    from mgpt4_dist.config import load_config
    from mgpt4_dist.models.llm import load_tokenizer
    from mgpt4_dist.models.minigpt4 import build_minigpt4
    from mgpt4_dist.models.sequence import SequenceBuilder
    from mgpt4_dist.parallel import apply_ac

    cfg = load_config(TINY_STAGE1, list(tiny_assets["overrides"]))
    tok = load_tokenizer(cfg.model.llm_path)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        model = build_minigpt4(cfg.model, seed=0)
        if checkpointed:
            assert apply_ac(model.llm) == len(model.llm.model.layers)
        text = SequenceBuilder(tok, model.num_image_tokens, 32, "\n", 3800)(["a red cube", "two blue balls on grass"])
        model(images, text).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-6, atol=1e-7)


def test_dynamic_loss_scaler_halves_on_overflow_and_grows_after_a_window():
    from mgpt4_dist.parallel.fsdp_engine import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=1024.0, window=3, min_scale=1.0)
    scaler.update(overflow=True)
    assert scaler.scale == 512.0
    for _ in range(3):
        scaler.update(overflow=False)
    assert scaler.scale == 1024.0
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.scale == 1024.0


def test_unknown_backend_names_the_choices():
    from mgpt4_dist.config import JobConfig
    from mgpt4_dist.parallel import build_engine

    cfg = JobConfig()
    cfg.parallel.backend = "ddp"
    with pytest.raises(ValueError, match="deepspeed or fsdp"):
        build_engine(cfg, torch.nn.Linear(1, 1), 1, 1)


def test_precision_check_gives_deepspeeds_answer_on_this_machine():
    """The check refuses exactly what DeepSpeed's accelerator refuses, whichever kind of CPU runs this."""
    from deepspeed.accelerator import get_accelerator

    from mgpt4_dist.parallel.base import precision_problem

    accelerator = get_accelerator()
    device = torch.device("cpu" if accelerator.device_name() == "cpu" else accelerator.device_name(0))
    assert (precision_problem("fp16", device) is None) == bool(accelerator.is_fp16_supported())
    assert (precision_problem("bf16", device) is None) == bool(accelerator.is_bf16_supported())
    assert precision_problem("fp32", device) is None


@pytest.mark.parametrize("backend", ["deepspeed", "fsdp"])
def test_fp16_on_a_cpu_without_onednn_fp16_is_refused_before_the_backend(backend, monkeypatch):
    from mgpt4_dist.config import ConfigError, JobConfig
    from mgpt4_dist.errors import UserError
    from mgpt4_dist.parallel import build_engine, engine

    cfg = JobConfig()
    cfg.parallel.backend, cfg.train.precision = backend, "fp16"
    monkeypatch.setattr(engine, "_cpu_has_onednn_fp16", lambda: False)
    with pytest.raises(ConfigError) as e:  # a UserError: mgpt4-train prints it as one line and exits 2
        build_engine(cfg, torch.nn.Linear(1, 1), 1, 1)
    assert isinstance(e.value, UserError)
    assert str(e.value).startswith("train.precision=fp16 is not supported on this CPU (no oneDNN fp16")
    assert str(e.value).endswith("use train.precision=bf16 or fp32, or run on a GPU")
    monkeypatch.setattr(engine, "_cpu_has_onednn_fp16", lambda: True)
    assert engine.precision_problem("fp16", torch.device("cpu")) is None
    assert engine.precision_problem("bf16", torch.device("cpu")) is None  # DeepSpeed's CPU accelerator: always


def test_fsdp_stop_and_resume_matches_uninterrupted(tiny_assets, run_train, tmp_path):
    """DCP checkpoint of llama_proj + AdamW + schedule; gradient accumulation across the resume point;
    a step folder without trainable_state.safetensors (an older version's) resumes on its own engine."""
    base = common(tiny_assets, "", steps=4)[:-1] + ["parallel.backend=fsdp", "checkpoint.every_steps=2",
                                                     "train.grad_accum_steps=2"]
    base = [a for a in base if not a.startswith("run_dir=")]
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
