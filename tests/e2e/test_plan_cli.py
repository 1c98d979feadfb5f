"""mgpt4-plan as a user runs it."""
import json
import os
import subprocess

from conftest import BIN, REPO


def run_plan(*args):
    return subprocess.run([os.path.join(BIN, "mgpt4-plan"), *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_plan_prints_every_choice_and_a_recommendation():
    proc = run_plan("--config", "mgpt4_dist/configs/stage1_vicuna13b.yaml", "--llm", "13b", "--gpus-per-node", "8",
                    "--nodes", "1", "--gpu-mem", "80GiB")
    assert proc.returncode == 0, proc.stderr
    for choice in ("zero0", "zero1", "zero2", "zero3", "zero3+off-opt+params", "fsdp"):
        assert f"\n{choice} " in proc.stdout
    assert "recommended:" in proc.stdout


def test_plan_json_and_overrides():
    proc = run_plan("--config", "mgpt4_dist/configs/stage1_vicuna7b.yaml", "--llm", "7b", "--nodes", "4", "--json",
                    "train.micro_batch_size=8")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ranks"] == 32 and result["micro_batch_size"] == 8


def test_plan_without_llm_shape_names_the_fix():
    proc = run_plan("--config", "mgpt4_dist/configs/stage1_vicuna7b.yaml", "model.llm_path=")
    assert proc.returncode == 2 and "--llm 7b" in proc.stderr
