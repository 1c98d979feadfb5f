"""`mgpt4-make-tiny-assets` as a user runs it: a subprocess, its stdout contract and exit codes."""
import glob
import os
import subprocess
import sys

import torch

from mgpt4_dist.tiny.assets import asset_paths, tiny_overrides


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mgpt4_dist.cli.make_tiny_assets", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_writes_assets_and_prints_the_overrides(tmp_path):
    out = tmp_path / "tiny"
    # A relative --out, as in a quickstart: the overrides must still name absolute paths.
    # --random: the contract without the pretraining (the quickstart test runs the default).
    args = ("--out", "tiny", "--num-samples", "12", "--samples-per-shard", "5", "--seed", "1", "--random")
    proc = run_cli(*args, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout  # one summary line, then the overrides line
    root = str(out)
    assert lines[0].startswith(f"tiny assets in {root} (random stand-ins): ")
    assert lines[1] == ("overrides: " + f"model.llm_path={root}/llm model.vit_checkpoint={root}/vit.pth "
                        f"model.qformer_checkpoint={root}/qformer.pth data.shards=[{root}/shards/*.tar]")
    assert lines[1] == "overrides: " + " ".join(tiny_overrides(asset_paths(root)))
    assert len(glob.glob(str(out / "shards" / "*.tar"))) == 3
    assert os.path.isfile(out / "llm" / "model.safetensors") and os.path.isfile(out / "llm" / "tokenizer.model")
    assert "query_tokens" in torch.load(out / "qformer.pth", weights_only=True)["model"]
    assert proc.stderr  # progress went to stderr, not stdout

    # A rerun reuses the folder and prints the same contract.
    vit_mtime = os.stat(out / "vit.pth").st_mtime_ns
    again = run_cli(*args, cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == lines[1]
    assert os.stat(out / "vit.pth").st_mtime_ns == vit_mtime

    forced = run_cli(*args, "--force", cwd=str(tmp_path))
    assert forced.returncode == 0, forced.stderr
    assert os.stat(out / "vit.pth").st_mtime_ns != vit_mtime


def test_cli_rejects_bad_input_with_exit_2(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    proc = run_cli("--out", str(a_file))
    assert proc.returncode == 2
    assert "not a directory" in proc.stderr and proc.stdout == ""
    assert a_file.read_text() == "not a folder"

    below_file = run_cli("--out", str(a_file / "sub"))
    assert below_file.returncode == 2 and f"{a_file} is not a directory" in below_file.stderr

    zero = run_cli("--out", str(tmp_path / "x"), "--num-samples", "0")
    assert zero.returncode == 2 and "--num-samples" in zero.stderr
    assert not os.path.exists(tmp_path / "x")
