"""A tiny stage-1 run learns to use the image: `tiny_stage1.yaml` exactly as shipped (only the asset
paths overridden), the pretrained stand-ins `mgpt4-make-tiny-assets` writes by default, one process,
stopped by SIGTERM in the middle as a cluster preempts it and resumed by the same command.

Held-out scenes come from seeds no asset uses; `mgpt4_dist.tiny.probe` scores them with the
projection at its initial state and as trained (the quickstart test checks the 2-process run)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import BIN, REPO, TINY_STAGE1, check_learnt, read_metrics

HELDOUT_SEEDS = (101, 202, 303)


@pytest.fixture(scope="module")
def heldout_sets(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout_learning")
    patterns = []
    for seed in HELDOUT_SEEDS:
        subprocess.run([os.path.join(BIN, "mgpt4-make-shards"), "--synthetic", "64", "--seed", str(seed),
                        "--out", str(out / str(seed)), "--samples-per-shard", "64"],
                       check=True, capture_output=True, timeout=300)
        patterns.append(f"{out / str(seed)}/*.tar")
    return patterns


def logged_step(run_dir) -> int:
    """The last step metrics.jsonl records; a line still being written counts as not there yet."""
    try:
        return max((m.get("step", 0) for m in read_metrics(str(run_dir))), default=0)
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_one_process_run_stopped_and_resumed_learns_to_use_the_image(learnable_assets, heldout_sets, tmp_path):
    from mgpt4_dist.tiny.probe import probe_run

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mgpt4_dist.train", "--config", TINY_STAGE1, *learnable_assets["overrides"],
           f"run_dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None and logged_step(run_dir) < 10:
            time.sleep(0.5)
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    assert first.returncode == 75, log.read_text()[-3000:]  # checkpointed, exit for requeue
    stopped_at = read_metrics(str(run_dir))[-1]["step"]
    assert 10 <= stopped_at < 40, stopped_at

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    steps = [m["step"] for m in read_metrics(str(run_dir)) if "loss" in m]
    assert steps[-1] == 40 and "resumed from" in second.stdout + second.stderr

    check_learnt([probe_run(str(run_dir), pattern) for pattern in heldout_sets])
