"""A non-finite loss: the batch is dropped on every rank and counted; too many in a row abort the run
with exit code 3 and the checkpoints already written untouched. Real runs of mgpt4-train on feature
shards whose features hold NaN (what a corrupt cache would give)."""
import io
import os
import tarfile

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import TINY_STAGE1, read_metrics
from mgpt4_dist.data.samples import FEATURES_FIELD, encode_features

TOKENS, WIDTH = 32, 64  # the tiny config's Q-Former output


def write_feature_shard(path, num_samples, nan_keys=()):
    generator = torch.Generator().manual_seed(0)
    with tarfile.open(path, "w") as tar:
        for i in range(num_samples):
            key = f"{i:06d}"
            features = torch.randn(TOKENS, WIDTH, generator=generator)
            if key in nan_keys:
                features[3, 5] = float("nan")
            for name, data in ((f"{key}.{FEATURES_FIELD}", encode_features(features)),
                               (f"{key}.txt", f"a photo of thing number {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def args(tiny_assets, shard, run_dir, *extra):
    weights = [o for o in tiny_assets["overrides"] if not o.startswith("data.shards=")]
    return ["--config", TINY_STAGE1, *weights, "data.features=true", f"data.shards=[{shard}]",
            f"run_dir={run_dir}", "train.log_every=1", *extra]


def test_nonfinite_batch_is_dropped_and_counted(tiny_assets, run_train, tmp_path):
    shard = str(tmp_path / "features-000000.tar")
    write_feature_shard(shard, 64, nan_keys={"000017"})
    run_dir = tmp_path / "run"
    proc = run_train(args(tiny_assets, shard, run_dir, "train.max_steps=12", "logging.peak_flops=1e12"),
                     launcher="none")
    metrics = read_metrics(str(run_dir))
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    # mfu: achieved FLOP/s over the configured peak, in metrics.jsonl and TensorBoard.
    assert all(m["flops_per_s"] > 0 and m["mfu"] == pytest.approx(m["flops_per_s"] / 1e12) for m in metrics)
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("perf/mfu")] == pytest.approx([m["mfu"] for m in metrics])
    assert acc.Scalars("train/nonfinite_steps")[-1].value == metrics[-1]["nonfinite_steps"]
    warnings = (proc.stdout + proc.stderr).count("non-finite loss at step")
    # 12 steps of 8 read 96+ of 64 samples: the NaN sample came up once or twice, its batch each time dropped.
    assert 1 <= metrics[-1]["nonfinite_steps"] == warnings <= 2, (metrics[-1], warnings)


def test_nonfinite_losses_in_a_row_abort_and_keep_the_checkpoint(tiny_assets, run_train, tmp_path):
    good, bad = str(tmp_path / "good.tar"), str(tmp_path / "bad.tar")
    write_feature_shard(good, 64)
    write_feature_shard(bad, 64, nan_keys={f"{i:06d}" for i in range(64)})
    run_dir = tmp_path / "run"
    run_train(args(tiny_assets, good, run_dir, "train.max_steps=4", "train.stop_at_step=2", "checkpoint.every_steps=2"),
              launcher="none")
    ckpt = run_dir / "checkpoints"
    before = {p: (ckpt / "step_00000002" / p).stat().st_mtime_ns for p in os.listdir(ckpt / "step_00000002")}
    # The resume switches data.shards to the corrupt shard: a change it must opt in to.
    proc = run_train(args(tiny_assets, bad, run_dir, "train.max_steps=4", "train.max_nonfinite_in_row=3",
                          "checkpoint.every_steps=2", "checkpoint.allow_changes=true"), launcher="none", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "3 non-finite losses in a row at step 3: aborting" in out, out[-3000:]
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert {p: (ckpt / "step_00000002" / p).stat().st_mtime_ns for p in os.listdir(ckpt / "step_00000002")} == before
