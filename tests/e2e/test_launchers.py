"""The launch/ scripts as a user runs them: DeepSpeed with a hostfile naming localhost, and torchrun."""
import os
import subprocess
import sys

import pytest

from helpers import REPO, TINY_STAGE1, free_port, read_metrics

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)


def run_script(script, args, env_extra):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(free_port()), **env_extra}
    proc = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_deepspeed_hostfile_with_localhost(tiny_assets, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir = tmp_path / "run"
    proc = run_script("deepspeed_hostfile.sh", [str(hostfile), TINY_STAGE1, *tiny_assets["overrides"],
                                                f"run_dir={run_dir}", "train.max_steps=2", "train.log_every=1"], {})
    assert [m["step"] for m in read_metrics(str(run_dir))] == [1, 2]
    assert "world 2" in proc.stdout


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed_single_node.sh"])
def test_single_node_script(script, tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_script(script, [TINY_STAGE1, *tiny_assets["overrides"], f"run_dir={run_dir}",
                               "train.max_steps=2", "train.log_every=1"], {"NPROC": "2"})
    assert [m["step"] for m in read_metrics(str(run_dir))] == [1, 2]
    assert "world 2 (env launcher" in proc.stdout
