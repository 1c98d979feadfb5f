"""DataLoader workers outlive the stop signals that launchers deliver to every process (USR1, TERM,
INT), and close() ends them: the rank, not the worker, decides when to stop."""
import os
import signal
import time

import psutil
import pytest

from mgpt4_dist.config import DataConfig
from mgpt4_dist.data.pipeline import STOP_SIGNALS, build_batch_loader, resolve_sources
from mgpt4_dist.data.shards import write_shards
from mgpt4_dist.tiny.scenes import synthetic_samples


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(synthetic_samples(40, seed=1, image_size=32), str(out), samples_per_shard=10, progress=False)
    return resolve_sources([(os.path.join(str(out), "*.tar"), 1.0)])


def test_workers_ignore_stop_signals_and_close_ends_them(sources):
    before = {p.pid for p in psutil.Process().children()}
    loader = build_batch_loader(DataConfig(num_workers=2, resample=True), sources, rank=0, world_size=1, seed=7,
                                batch_size=4, image_size=32)
    next(loader)
    workers = [p for p in psutil.Process().children() if p.pid not in before]
    assert len(workers) == 2
    for sig in STOP_SIGNALS:
        for w in workers:
            os.kill(w.pid, sig)
    time.sleep(0.5)
    for _ in range(6):  # batches from both workers: neither died (torch would raise "killed by signal")
        next(loader)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    # The rank's own handlers are untouched by the worker setup.
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    loader.close()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
