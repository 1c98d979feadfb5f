"""metrics.jsonl and TensorBoard across a crash restart: every step appears once."""
import json
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mgpt4_dist.metrics import MetricsLogger

VALUES = {"loss": 1.0, "lr": 1e-4, "samples_per_s": 1.0, "skipped": 0}


def steps_in(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_a_resumed_run_drops_what_a_crashed_attempt_logged_past_its_checkpoint(tmp_path):
    run_dir = str(tmp_path)
    first = MetricsLogger(run_dir, 10, enabled=True, progress=False)
    for step in range(1, 6):  # checkpoint at 3, crash after 5
        first.log(step, {**VALUES, "loss": float(step)})
    first.close()
    second = MetricsLogger(run_dir, 10, enabled=True, progress=False, resume_step=3)
    for step in range(4, 7):
        second.log(step, {**VALUES, "loss": 10.0 + step})
    second.close()
    assert steps_in(run_dir) == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(os.path.join(run_dir, "tb"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
