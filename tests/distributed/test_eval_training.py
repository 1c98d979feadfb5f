"""Evaluation during training (eval.*): records and TensorBoard, no effect on training, exact resume,
and the same validation loss for any world size and engine on the same weights."""
import json
import math
import os

from helpers import EVAL_ARGS, read_metrics
from mgpt4_dist.export.consolidate import consolidate


def split(records):
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    return train, evals


def test_eval_records_samples_and_tensorboard(eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = eval_run["run_dir"]
    train, evals = split(read_metrics(run_dir))
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(r) == {"step", "val_loss", "val_tokens", "eval_time_s", "val_bleu4", "val_cider"}
        assert math.isfinite(r["val_loss"]) and r["val_tokens"] > 5 and r["eval_time_s"] > 0
        assert 0 <= r["val_bleu4"] <= 1 and r["val_cider"] >= 0
    with open(os.path.join(run_dir, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert [(s["step"], s["key"]) for s in samples] == [(2, "00000000"), (2, "00000001"), (4, "00000000"),
                                                         (4, "00000001")]
    assert all(isinstance(s["caption"], str) and s["reference"] for s in samples)

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("val/loss", "val/cider", "val/bleu4", "train/loss"):
        assert tag in tags["scalars"], tags["scalars"]
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]
    assert all(math.isclose(e.value, r["val_loss"], rel_tol=1e-6) for e, r in zip(acc.Scalars("val/loss"), evals))
    assert all(math.isclose(e.value, r["val_cider"], rel_tol=1e-6, abs_tol=1e-6)
               for e, r in zip(acc.Scalars("val/cider"), evals))
    text_tags = [t for t in tags["tensors"] if t.startswith("samples/")]
    assert len(text_tags) == 2, tags["tensors"]
    last = acc.Tensors(text_tags[0])[-1]
    text = last.tensor_proto.string_val[0].decode()
    assert last.step == 4 and samples[2]["caption"] in text and samples[2]["reference"] in text
    # add_text files its tag under TAG/text_summary; the image of the same sample is TAG/image.
    assert sorted(t for t in tags["images"] if t.startswith("samples/")) == sorted(
        t.replace("/text_summary", "") + "/image" for t in text_tags)


def test_eval_changes_no_training_and_resume_is_exact(eval_run, run_train, tmp_path):
    """The same run with eval off to step 2 (stopped there), then resumed with eval on to step 4:
    every training record equals the uninterrupted eval-on run's, and so does the step-4 evaluation."""
    run_dir = str(tmp_path / "run")
    run_train(eval_run["args"] + [f"run_dir={run_dir}", "train.stop_at_step=2"], nproc=2)
    run_train(eval_run["args"] + [f"run_dir={run_dir}", f"eval.shards=[{eval_run['shards']}]", *EVAL_ARGS], nproc=2)
    ref_train, ref_evals = split(read_metrics(eval_run["run_dir"]))
    train, evals = split(read_metrics(run_dir))
    keys = ("step", "loss", "grad_norm", "lr")
    assert [{k: r[k] for k in keys} for r in train] == [{k: r[k] for k in keys} for r in ref_train]
    assert [r["step"] for r in evals] == [4]
    assert evals[0]["val_loss"] == ref_evals[1]["val_loss"] and evals[0]["val_tokens"] == ref_evals[1]["val_tokens"]


def test_val_loss_is_the_same_for_world_sizes_and_engines(eval_run, run_train, tmp_path):
    """The weights of step 2 of the ZeRO-3 x 2 run, evaluated by 1 process at ZeRO-2 and by 2 ranks
    under FSDP2 (a step at learning rate 0 before the evaluation leaves them as they are)."""
    consolidate(os.path.join(eval_run["run_dir"], "checkpoints", "step_00000002"), str(tmp_path / "step2"))
    _, ref_evals = split(read_metrics(eval_run["run_dir"]))
    reference = ref_evals[0]
    frozen = ["train.max_steps=1", f"model.proj_checkpoint={tmp_path / 'step2' / 'minigpt4.pth'}", "optim.lr=0",
              "optim.min_lr=0", "optim.warmup_start_lr=0", f"eval.shards=[{eval_run['shards']}]", *EVAL_ARGS]
    for name, nproc, launcher, engine in (("zero2_w1", 1, "none", ["parallel.zero_stage=2"]),
                                          ("fsdp_w2", 2, "torchrun", ["parallel.backend=fsdp"])):
        run_dir = str(tmp_path / name)
        run_train(eval_run["args"] + engine + frozen + [f"run_dir={run_dir}"], nproc=nproc, launcher=launcher)
        _, evals = split(read_metrics(run_dir))
        assert evals[0]["val_tokens"] == reference["val_tokens"], name
        assert math.isclose(evals[0]["val_loss"], reference["val_loss"], rel_tol=1e-6), (name, evals, reference)
