"""mgpt4-eval on a training run: the same loss and captions as the run's own evaluation, a progress bar,
a summary line, the captions file; clear errors for shards without references and empty shards."""
import io
import json
import math
import os
import subprocess
import tarfile

from helpers import BIN, read_metrics, write_tar

EVAL = os.path.join(BIN, "mgpt4-eval")


def run_eval(*args):
    return subprocess.run([EVAL, *args], capture_output=True, text=True, timeout=300)


def test_eval_matches_the_runs_own_evaluation(eval_run, tmp_path):
    out = tmp_path / "captions.jsonl"
    proc = run_eval("--model", eval_run["run_dir"], "--shards", eval_run["shards"], "--max-samples", "5",
                    "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "100%" in proc.stderr  # the progress bar
    step4 = [r for r in read_metrics(eval_run["run_dir"]) if "val_loss" in r][-1]  # the run's latest checkpoint
    assert result["samples"] == 5 and result["tokens"] == step4["val_tokens"]
    assert math.isclose(result["loss"], step4["val_loss"], rel_tol=1e-6), (result, step4)
    with open(out) as f:
        captions = [json.loads(line) for line in f]
    with open(os.path.join(eval_run["run_dir"], "samples.jsonl")) as f:
        shown = [json.loads(line) for line in f if json.loads(line)["step"] == 4]
    assert len(captions) == 5 and all(c["references"] for c in captions)
    assert [(c["key"], c["caption"]) for c in captions[:2]] == [(s["key"], s["caption"]) for s in shown]
    assert math.isclose(result["cider"], step4["val_cider"], rel_tol=1e-6, abs_tol=1e-9)

    summary = run_eval("--model", os.path.join(eval_run["run_dir"], "checkpoints", "step_00000002"), "--shards",
                       eval_run["shards"], "--max-samples", "2", "--max-new-tokens", "2")
    assert summary.returncode == 0, summary.stderr[-3000:]
    line = summary.stdout.strip().splitlines()[-1]
    assert line.startswith("mgpt4-eval: 2 samples from ") and "BLEU-4" in line and "CIDEr-D" in line, line


def test_eval_errors(eval_run, tmp_path):
    with open(eval_run["shards"].replace("*.tar", "shard-000000.tar"), "rb") as f:
        jpg = next(data for name, data in _members(f.read()) if name.endswith(".jpg"))
    write_tar(tmp_path / "nocaps.tar", [("a.jpg", jpg), ("b.jpg", jpg)])
    write_tar(tmp_path / "empty.tar", [])
    for shards, message in ((tmp_path / "nocaps.tar", "no sample has a reference caption"),
                            (tmp_path / "empty.tar", "the shards are empty")):
        proc = run_eval("--model", eval_run["run_dir"], "--shards", str(shards))
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("mgpt4-eval: error: ") and message in lines[-1], proc.stderr[-2000:]


def _members(data):
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            yield info.name, tar.extractfile(info).read()
