"""Training on remote shards as users run it: `pipe:curl` and `http://` from a fault-injecting HTTP
server process, `s3://` from moto's S3 server process written by `mgpt4-make-shards --out s3://`.

One training run per mechanism: the HTTP/pipe run is interrupted mid-shard and resumed and must
give the local run's losses step for step (the same samples, in the same order) despite a
connection reset, a 500 and a server without Range support; the S3 run counts a missing key in
`skipped_shards` (metrics.jsonl and TensorBoard). The fault matrix and the start-time checks (wrong
bucket, missing tool) are in tests/unit/test_remote.py.
"""
import os
import subprocess

import pytest

from helpers import BIN, TINY_STAGE1, read_metrics
from mgpt4_dist.data.pipeline import ShardStream, Source
from remote_servers import fault_http_server, moto_s3_server, requests_made

pytestmark = pytest.mark.slow


def _base_args(tiny_assets, run_dir, shards, *more):
    overrides = [o for o in tiny_assets["overrides"] if not o.startswith("data.shards=")]
    return ["--config", TINY_STAGE1, *overrides, f"run_dir={run_dir}", f"data.shards=[{shards}]",
            "train.log_every=1", "checkpoint.every_steps=100", "data.retry_backoff_s=0.05", *more]


def test_pipe_and_http_shards_train_resume_and_retry_like_local_files(tiny_assets, run_train, tmp_path):
    shard_dir = os.path.dirname(tiny_assets["shards_pattern"])
    local_sources = (f"{{pattern: {os.path.join(shard_dir, 'shard-{000000,000001}.tar')}, weight: 1}}, "
                     f"{{pattern: {os.path.join(shard_dir, 'shard-{000002,000003}.tar')}, weight: 3}}")
    run_train(_base_args(tiny_assets, tmp_path / "local", local_sources, "train.max_steps=6"), launcher="none")
    expected = [(m["step"], m["loss"]) for m in read_metrics(str(tmp_path / "local"))]
    assert [s for s, _ in expected] == [1, 2, 3, 4, 5, 6]

    log = str(tmp_path / "requests.jsonl")
    with fault_http_server(shard_dir, log) as base:
        remote_sources = (f"{{pattern: pipe:curl -s -f {base}/reset/shard-{{000000,000001}}.tar, weight: 1}}, "
                          f"{{pattern: {base}/norange+fail500+reset/shard-{{000002,000003}}.tar, weight: 3}}")
        run_dir = tmp_path / "remote"
        # Stopped after 3 steps (24 samples: inside a 32-sample shard), then resumed to step 6.
        run_train(_base_args(tiny_assets, run_dir, remote_sources, "train.max_steps=6", "train.stop_at_step=3"),
                  launcher="none")
        run_train(_base_args(tiny_assets, run_dir, remote_sources, "train.max_steps=6"), launcher="none")
    records = read_metrics(str(run_dir))
    assert [(m["step"], m["loss"]) for m in records] == expected
    assert all(m["skipped_shards"] == 0 and m["skipped"] == 0 for m in records)
    seen = requests_made(log)
    assert any(r["status"] == -1 for r in seen)  # connections were reset mid-shard ...
    assert any(r["status"] == 500 for r in seen)  # ... and failed once, and all of it was retried
    assert any(r["range"] and r["status"] == 200 for r in seen)  # Range ignored: read again, bytes skipped


def test_s3_shards_written_by_make_shards_train_and_count_a_missing_key(tiny_assets, run_train, tmp_path):
    import boto3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with moto_s3_server() as s3_env:
        env = {**os.environ, **s3_env}
        boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="train-data")
        made = subprocess.run([os.path.join(BIN, "mgpt4-make-shards"), "--synthetic", "48", "--samples-per-shard", "16",
                               "--image-size", "32", "--out", "s3://train-data/synthetic"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert made.returncode == 0, made.stderr[-2000:]
        assert made.stdout.strip().endswith(
            "to s3://train-data/synthetic (shard-000000.tar .. shard-000002.tar)"), made.stdout
        # Three shards exist, shard-000003 does not: a pass (48 samples, 6 steps) meets the hole.
        shards = "s3://train-data/synthetic/shard-{000000..000003}.tar"
        run_dir = tmp_path / "s3"
        run_train(_base_args(tiny_assets, run_dir, shards, "train.max_steps=7", "data.resample=false"),
                  launcher="none", env=s3_env)
    records = read_metrics(str(run_dir))
    assert [m["step"] for m in records] == list(range(1, 8))
    # Step 7 reads the first batch of the second pass: the hole was met in the first pass, and
    # again on the way if the second pass starts with it.
    hole = "s3://train-data/synthetic/shard-000003.tar"
    split = ShardStream([Source([hole.replace("3.tar", f"{i}.tar") for i in range(4)], 1.0)], rank=0, world_size=1,
                        num_workers=1, seed=42, resample=False, batch_size=8, image_size=32, clean_captions=True,
                        max_caption_words=50)
    expected = 1 + (split.epoch_split(0, 1)[0] == hole)
    assert records[-1]["skipped_shards"] == expected and records[-1]["skipped"] == 0
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("data/skipped_shards")][-1] == expected
