"""Shared fixtures: tiny assets built once per session, and a runner for real training processes.
Plain helpers (paths, free_port, read_metrics) are in tests/helpers.py; no test imports this file."""
import os
import subprocess
import sys

import pytest

from helpers import BIN, EVAL_ARGS, EVAL_TRAIN_ARGS, REPO, TINY_STAGE1, free_port


@pytest.fixture(scope="session", autouse=True)
def stand_in_cache(tmp_path_factory):
    """A session's own cache of pretrained tiny stand-ins: the suite pretrains them once (whichever test
    needs them first: the quickstart, the installed wheel, the learning test), and always does."""
    path = str(tmp_path_factory.mktemp("mgpt4_cache"))
    previous = os.environ.get("MGPT4_CACHE_DIR")
    os.environ["MGPT4_CACHE_DIR"] = path  # subprocesses (CLIs, launchers) inherit it
    yield path
    if previous is None:
        os.environ.pop("MGPT4_CACHE_DIR", None)
    else:
        os.environ["MGPT4_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Tiny LLaMA folder + tokenizer, original-layout ViT/Q-Former files, synthetic shards: the random
    primitives (nothing to learn; loaders, layouts, engines)."""
    from mgpt4_dist.tiny.assets import build_tiny_assets, tiny_overrides

    paths = build_tiny_assets(str(tmp_path_factory.mktemp("tiny_assets")), num_samples=128, samples_per_shard=32,
                              pretrained=False)
    return {**paths, "overrides": tiny_overrides(paths)}


@pytest.fixture(scope="session")
def learnable_assets(tmp_path_factory):
    """The bundle `mgpt4-make-tiny-assets` writes by default: pretrained stand-ins, 256 training scenes."""
    from mgpt4_dist.tiny.assets import build_tiny_assets, tiny_overrides

    paths = build_tiny_assets(str(tmp_path_factory.mktemp("learnable_assets")))
    return {**paths, "overrides": tiny_overrides(paths)}


@pytest.fixture(scope="session")
def tiny_trained_run(tiny_assets, run_train, tmp_path_factory):
    """A 2-step tiny stage-1 run (one process, a high lr so llama_proj moves), shared by the export tests;
    tests read it and write elsewhere."""
    run_dir = str(tmp_path_factory.mktemp("tiny_trained") / "run")
    run_train(["--config", TINY_STAGE1, *tiny_assets["overrides"], f"run_dir={run_dir}", "train.max_steps=2",
               "optim.lr=3e-3"], launcher="none")
    return run_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_trained_run, tmp_path_factory):
    """tiny_trained_run consolidated: what mgpt4-chat and mgpt4-demo load."""
    from mgpt4_dist.export.consolidate import consolidate

    out = str(tmp_path_factory.mktemp("tiny_model") / "model")
    consolidate(tiny_trained_run, out)
    return out

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


@pytest.fixture(scope="session")
def heldout_shards(tmp_path_factory):
    """Held-out synthetic scenes (a seed the tiny assets never use), as a user writes them."""
    out = tmp_path_factory.mktemp("heldout")
    subprocess.run([os.path.join(BIN, "mgpt4-make-shards"), "--synthetic", "5", "--seed", "9001", "--out", str(out),
                    "--samples-per-shard", "3"], check=True, capture_output=True, timeout=300)
    return f"{out}/*.tar"


@pytest.fixture(scope="session")
def eval_run(tiny_assets, run_train, heldout_shards, tmp_path_factory):
    """Stage 1 at ZeRO-3 on 2 ranks with eval on: evaluated at steps 2 and 4, checkpoints at 2 and 4."""
    run_dir = str(tmp_path_factory.mktemp("eval_run") / "run")
    args = ["--config", TINY_STAGE1, *tiny_assets["overrides"], *EVAL_TRAIN_ARGS, "parallel.zero_stage=3"]
    run_train(args + [f"run_dir={run_dir}", f"eval.shards=[{heldout_shards}]", *EVAL_ARGS], nproc=2)
    return {"run_dir": run_dir, "args": args, "shards": heldout_shards}
