"""What used to give silent wrong results, as a user meets it (issue 12): random frozen towers,
a second run over an earlier one, a resume with a changed batch, a finished run started again,
data of the wrong kind, disagreeing bad-sample counts. Refusals exit 2 with one line naming the
bad key or path and the fix."""
import io
import json
import os
import subprocess

import numpy as np
import pytest
import yaml

from helpers import BIN, REPO, TINY_STAGE1, read_metrics, write_tar
from mgpt4_dist.config import ConfigError, load_config

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(command, *args):
    return subprocess.run([os.path.join(BIN, command), *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=ENV, cwd=REPO)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def refused(proc, command="mgpt4-train"):
    """The one error line of a refusal."""
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{command}: error: "), proc.stderr[-3000:]
    return line


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def tiny_without(tiny_assets, *prefixes):
    return [o for o in tiny_assets["overrides"] if not o.startswith(prefixes)]


BAD = (1, 3, 5)  # indices of the corrupt JPEGs in the one 8-sample shard


def test_run_dir_resume_and_skip_counts(tiny_assets, tmp_path):
    """One run of 2 steps on a shard with 3 corrupt JPEGs, then everything a user may do next in its run dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mgpt4_dist.tiny.scenes import synthetic_samples

    members = []
    for i, (key, jpeg, caption) in enumerate(synthetic_samples(8, seed=1)):
        members += [(f"{key}.jpg", b"not a jpeg" if i in BAD else jpeg), (f"{key}.txt", caption.encode())]
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "bad-000000.tar", members)
    bad_keys = [members[2 * i][0].split(".")[0] for i in BAD]
    run_dir = tmp_path / "run"
    # data.num_workers as shipped (1 worker process, reading ahead of training).
    base = ["--config", TINY_STAGE1, *tiny_without(tiny_assets, "data.shards"), f"data.shards=[{tmp_path}/data/*.tar]",
            f"run_dir={run_dir}", "train.log_every=1"]

    out = ok(run("mgpt4-train", *base, "train.max_steps=2"))
    # 1. every weight file read is listed with its size and quick hash
    for what, path in (("EVA ViT (model.vit_checkpoint)", tiny_assets["vit_checkpoint"]),
                       ("Q-Former (model.qformer_checkpoint)", tiny_assets["qformer_checkpoint"]),
                       ("LLM (model.llm_path)", os.path.join(tiny_assets["llm_path"], "model.safetensors"))):
        assert f"weights: {what} from {path} (" in out and "quick hash" in out, what
    assert "weights: llama_proj randomly initialised (no model.proj_checkpoint)" in out
    # 6. one count: 3 bad per pass of the shard; step 1 ends 3 good samples into pass 2 (5 skipped),
    # step 2 one good sample into pass 4 (9); the same in the progress line, metrics.jsonl and TensorBoard.
    assert [m["skipped"] for m in read_metrics(run_dir)] == [5, 9]
    assert "skipped 5 |" in out and "skipped 9 |" in out
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("data/skipped")] == [5, 9]
    assert "so far on stream" not in out
    for key in bad_keys:  # met on every pass (4 of them, more read ahead), named once
        assert sum(f"sample {key!r}" in line for line in out.splitlines()) == 1, key

    config_before = (run_dir / "config.yaml").read_bytes()
    # 4. a finished run started again, or stopped before its checkpoint's step
    assert "already at step 2 of 2: nothing to do" in ok(run("mgpt4-train", *base, "train.max_steps=2"))
    assert "already at step 2 of 3 (train.stop_at_step=1): nothing to do" in ok(
        run("mgpt4-train", *base, "train.max_steps=3", "train.stop_at_step=1"))
    # 2. a new run over this one
    line = refused(run("mgpt4-train", *base, "train.max_steps=2", "checkpoint.resume=never"))
    assert (f"run_dir={run_dir} holds another run (checkpoints step_00000002 and metrics.jsonl with steps 1-2)"
            in line and "checkpoint.resume=never run.overwrite=true" in line), line
    with pytest.raises(ConfigError, match="run.overwrite=true clears the run dir.*add checkpoint.resume=never"):
        load_config(TINY_STAGE1, ["run.overwrite=true"])  # never with resume=auto: a requeue would wipe its run
    # 3. a resume with another micro-batch
    line = refused(run("mgpt4-train", *base, "train.max_steps=3", "train.micro_batch_size=4"))
    assert "with changes that break exact resume: train.micro_batch_size 8 -> 4" in line, line
    assert "checkpoint.allow_changes=true" in line
    assert (run_dir / "config.yaml").read_bytes() == config_before
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]

    out = ok(run("mgpt4-train", *base, "train.max_steps=3", "train.micro_batch_size=4",
                 "checkpoint.allow_changes=true"))
    assert "changes that break exact resume (checkpoint.allow_changes=true): train.micro_batch_size 8 -> 4" in out
    assert "train.max_steps 2 -> 3" in out  # printed, not refused: the schedule follows the new length
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[2]["skipped"] >= 9

    # 2. starting over on purpose, here also on random towers asked for explicitly (1.)
    out = ok(run("mgpt4-train", *base, "train.max_steps=1", "checkpoint.resume=never", "run.overwrite=true",
                 "model.qformer_checkpoint=", "model.allow_random_weights=true"))
    assert "deleted the earlier run" in out and "frozen towers are RANDOM" in out
    assert [m["step"] for m in read_metrics(run_dir)] == [1]
    assert sorted(n for n in os.listdir(run_dir / "checkpoints") if n.startswith("step_")) == ["step_00000001"]
    assert len(os.listdir(run_dir / "tb")) == 1


def test_empty_frozen_weight_paths_are_refused_by_every_command(tiny_assets, tmp_path):
    import torch
    from PIL import Image

    from mgpt4_dist.config import save_config

    no_towers = tiny_without(tiny_assets, "model.vit_checkpoint", "model.qformer_checkpoint")
    # The shipped tiny config as it is: empty tower paths.
    line = refused(run("mgpt4-train", "--config", TINY_STAGE1, *no_towers, f"run_dir={tmp_path / 'r'}"))
    assert ("model.vit_checkpoint and model.qformer_checkpoint are empty: the frozen ViT and Q-Former would be random"
            in line and "model.allow_random_weights=true" in line), line
    assert not (tmp_path / "r").exists()
    torch_images = tmp_path / "images.pt"
    torch.save(torch.zeros(1, 3, 224, 224), torch_images)
    (tmp_path / "answers.json").write_text(json.dumps(["a red square"]))
    line = refused(run("mgpt4-eval-loss", "--config", TINY_STAGE1, *no_towers, "--images", torch_images,
                       "--answers", tmp_path / "answers.json"), "mgpt4-eval-loss")
    assert "model.vit_checkpoint and model.qformer_checkpoint are empty" in line, line
    line = refused(run("mgpt4-cache-features", "--config", TINY_STAGE1, *tiny_without(tiny_assets, "model.qformer"),
                       "--out", tmp_path / "feats"), "mgpt4-cache-features")
    assert "model.qformer_checkpoint is empty: the frozen Q-Former would be random" in line, line
    # mgpt4-chat on a model folder whose config.yaml names no ViT file
    model = tmp_path / "model"
    model.mkdir()
    cfg = load_config(TINY_STAGE1, [*tiny_assets["overrides"], "model.vit_checkpoint="])
    save_config(cfg, str(model / "config.yaml"))
    (model / "config.json").write_text("{}")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    line = refused(run("mgpt4-chat", "--model", model, "--image", tmp_path / "red.png", "--prompt", "hi"), "mgpt4-chat")
    assert f"model.vit_checkpoint is empty in {model}/config.yaml" in line and "--vit-checkpoint" in line, line


def test_data_of_the_wrong_kind_is_refused_at_start(tiny_assets, tmp_path):
    base = ["--config", TINY_STAGE1, *tiny_without(tiny_assets, "data.shards"), f"run_dir={tmp_path / 'r'}"]
    image_shards = tiny_assets["shards_pattern"]
    line = refused(run("mgpt4-train", *base, f"data.shards=[{image_shards}]", "data.features=true"))
    assert "data.features=true but" in line and "shard-000000.tar holds images (" in line, line
    assert "mgpt4-cache-features" in line

    caption = json.dumps({"caption": "a red square"}).encode()
    feats = tmp_path / "feats"  # as mgpt4-cache-features writes them, for this model: [32 tokens, 64]
    feats.mkdir()
    write_tar(feats / "f-000000.tar", [("k0.npy", npy(np.zeros((32, 64), np.float32))), ("k0.json", caption)])
    line = refused(run("mgpt4-train", *base, f"data.shards=[{feats}/*.tar]"))
    assert f"data.features=false but {feats}/f-000000.tar holds cached vision features (k0.npy" in line, line

    wide = tmp_path / "wide"  # cached for a model with 128-wide features, no features.json beside
    wide.mkdir()
    write_tar(wide / "f-000000.tar", [("k0.npy", npy(np.zeros((32, 128), np.float32))), ("k0.json", caption)])
    line = refused(run("mgpt4-train", *base, f"data.shards=[{wide}/*.tar]", "data.features=true"))
    assert (f"{wide}/f-000000.tar was cached for another model: its features have shape [32, 128], "
            f"this model takes [32, 64]") in line, line

    (feats / "features.json").write_text(json.dumps({"model": {"has_qformer": False}}))
    line = refused(run("mgpt4-train", *base, f"data.shards=[{feats}/*.tar]", "data.features=true"))
    assert f"{feats}/features.json records model.has_qformer False there, True here" in line, line
