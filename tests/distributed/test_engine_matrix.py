"""Engine x precision x memory-option combinations through `mgpt4-train` on 2 gloo processes: each
trains (finite losses, every step logged, a checkpoint written) and reports what it chose.

test_engines.py checks that the fp32 engines agree numerically; this covers the options that file
does not run from the CLI: fp16 with DeepSpeed's and FSDP's loss scaling, ZeRO-2/3 with only the
optimizer offloaded, bf16 at ZeRO-0/1/3, and activation checkpointing. Two steps each, micro-batch 1
(half precisions are slow on this CPU).

A precision this machine cannot train in (fp16 on a CPU without oneDNN fp16, as DeepSpeed's own
accelerator judges it) must instead be refused before training with one error line per rank and
exit code 2, on both backends: which branch runs depends on the CPU, so the suite means the same
on either kind."""
import math

import pytest
import torch

from helpers import TINY_STAGE1, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def supported_here(precision: str) -> bool:
    """DeepSpeed's own answer for the device these runs use (its accelerator is the one it checks)."""
    from deepspeed.accelerator import get_accelerator

    checks = {"fp16": get_accelerator().is_fp16_supported, "bf16": get_accelerator().is_bf16_supported}
    return precision not in checks or bool(checks[precision]())

COMBOS = {
    "zero1-fp16": ["parallel.zero_stage=1", "train.precision=fp16"],
    "fsdp-fp16": ["parallel.backend=fsdp", "train.precision=fp16"],
    "zero0-bf16": ["parallel.zero_stage=0", "train.precision=bf16"],
    "zero2-offload-optimizer-bf16": ["parallel.zero_stage=2", "parallel.offload=optimizer", "train.precision=bf16"],
    "zero3-offload-optimizer-bf16-actckpt": ["parallel.zero_stage=3", "parallel.offload=optimizer",
                                             "train.precision=bf16", "parallel.activation_checkpointing=true"],
    "fsdp-fp32-actckpt": ["parallel.backend=fsdp", "parallel.activation_checkpointing=true"],
}


def engine_fp32_weights(run_dir, name):
    """The final fp32 master weights as each engine's own tools read them."""
    step_dir = run_dir / "checkpoints" / "step_00000002"
    if name.startswith("zero0"):  # in half precision DeepSpeed keeps fp32 copies in FP16_UnfusedOptimizer
        # Our own DeepSpeed output (it pickles its config objects), not a user-supplied file.
        masters = torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]["fp32_groups"]
        return {"llama_proj.weight": masters[0][0], "llama_proj.bias": masters[1][0]}  # decayed group, then biases
    if name.startswith("fsdp"):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(str(step_dir), str(run_dir / "gathered.pt"))
        return torch.load(run_dir / "gathered.pt", weights_only=True)["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), exclude_frozen_parameters=True)


@pytest.mark.parametrize("name", list(COMBOS))
def test_combination_trains_from_the_cli(name, tiny_assets, run_train, tmp_path):
    run_dir = tmp_path / "run"
    precision = next((a.split("=")[1] for a in COMBOS[name] if a.startswith("train.precision=")), "fp32")
    proc = run_train(["--config", TINY_STAGE1, *tiny_assets["overrides"], f"run_dir={run_dir}", "train.max_steps=2",
                      "train.log_every=1", "train.micro_batch_size=1", *COMBOS[name]],
                     launcher="torchrun", check=supported_here(precision))
    if not supported_here(precision):
        # Refused when the engine is built: every rank exits 2 (torchrun reports the exit codes) and rank 0
        # says why in one line; no DeepSpeed traceback, no step taken.
        assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
        line = f"mgpt4-train: error: train.precision={precision} is not supported on this CPU"
        assert proc.stderr.count(line) == 1, proc.stderr[-3000:]
        assert "use train.precision=bf16 or fp32, or run on a GPU" in proc.stderr
        assert "[rank0]: Traceback" not in proc.stderr and "not supported on your device" not in proc.stderr
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
        return
    metrics = read_metrics(str(run_dir))
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in metrics), metrics
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    out = proc.stdout + proc.stderr
    if "actckpt" in name:
        assert "activation checkpointing" in out, out[-3000:]
    if "fp16" in name:
        assert metrics[-1]["fp16_skipped_steps"] >= 0
    # The engine-neutral trainable state holds the engine's fp32 master weights (half precisions and
    # offload keep them in other places than fp32 runs do), and the fp16 loss scale.
    from mgpt4_dist.checkpoint.state import read_trainable_state

    saved = read_trainable_state(str(run_dir))
    reference = engine_fp32_weights(run_dir, name)
    for key, value in saved.tensors("fp32").items():
        assert value.dtype == torch.float32 and torch.equal(value, reference[key].float()), key
    assert saved.counters()["global_steps"] == 2
    loss_scale = saved.counters()["loss_scale"]
    if "fp16" in name:
        assert loss_scale is not None and loss_scale > 0
    else:
        assert loss_scale is None
