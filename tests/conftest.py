"""Shared fixtures: tiny assets built once per session, and a runner for real training processes."""
import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_STAGE1 = os.path.join(REPO, "mgpt4_dist", "configs", "tiny_stage1.yaml")
TINY_STAGE2 = os.path.join(REPO, "mgpt4_dist", "configs", "tiny_stage2.yaml")
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Tiny LLaMA folder + tokenizer, original-layout ViT/Q-Former files, synthetic shards."""
    from mgpt4_dist.tiny.assets import build_tiny_assets, tiny_overrides

    paths = build_tiny_assets(str(tmp_path_factory.mktemp("tiny_assets")), num_samples=128, samples_per_shard=32)
    return {**paths, "overrides": tiny_overrides(paths)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def run_train():
    """Run mgpt4-train as a user would: `deepspeed`, `torchrun` or a plain process."""

    def run(args, nproc=2, launcher="deepspeed", timeout=600, env=None, check=True):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        if launcher == "deepspeed":
            cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
                   "--module", "mgpt4_dist.train"]
        elif launcher == "torchrun":
            cmd = [os.path.join(BIN, "torchrun"), "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
                   "-m", "mgpt4_dist.train"]
        else:
            cmd = [sys.executable, "-m", "mgpt4_dist.train"]
        proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
        return proc

    return run
