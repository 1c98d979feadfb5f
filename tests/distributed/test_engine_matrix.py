"""Engine x precision x memory-option combinations through `mgpt4-train` on 2 gloo processes: each
trains (finite losses, every step logged, a checkpoint written) and reports what it chose.

test_engines.py checks that the fp32 engines agree numerically; this covers the options that file
does not run from the CLI: fp16 with DeepSpeed's and FSDP's loss scaling, ZeRO-2/3 with only the
optimizer offloaded, bf16 at ZeRO-0/1/3, and activation checkpointing. Two steps each, micro-batch 1
(half precisions are slow on this CPU)."""
import math

import pytest

from conftest import TINY_STAGE1, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

COMBOS = {
    "zero1-fp16": ["parallel.zero_stage=1", "train.precision=fp16"],
    "fsdp-fp16": ["parallel.backend=fsdp", "train.precision=fp16"],
    "zero0-bf16": ["parallel.zero_stage=0", "train.precision=bf16"],
    "zero2-offload-optimizer-bf16": ["parallel.zero_stage=2", "parallel.offload=optimizer", "train.precision=bf16"],
    "zero3-offload-optimizer-bf16-actckpt": ["parallel.zero_stage=3", "parallel.offload=optimizer",
                                             "train.precision=bf16", "parallel.activation_checkpointing=true"],
    "fsdp-fp32-actckpt": ["parallel.backend=fsdp", "parallel.activation_checkpointing=true"],
}


@pytest.mark.parametrize("name", list(COMBOS))
def test_combination_trains_from_the_cli(name, tiny_assets, run_train, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(["--config", TINY_STAGE1, *tiny_assets["overrides"], f"run_dir={run_dir}", "train.max_steps=2",
                      "train.log_every=1", "train.micro_batch_size=1", "data.num_workers=0", *COMBOS[name]],
                     launcher="torchrun")
    metrics = read_metrics(str(run_dir))
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in metrics), metrics
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    out = proc.stdout + proc.stderr
    if "actckpt" in name:
        assert "activation checkpointing" in out, out[-3000:]
    if "fp16" in name:
        assert metrics[-1]["fp16_skipped_steps"] >= 0
