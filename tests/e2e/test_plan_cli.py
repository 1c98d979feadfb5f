"""mgpt4-plan as a user runs it."""
import json
import os
import subprocess

import pytest

from helpers import BIN, REPO


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



def test_gpu_mem_units_and_never_advising_what_does_not_fit():
    """A bare --gpu-mem is GiB (it was read as bytes: every row NO, then advice that did not fit either)."""
    from mgpt4_dist.plan import GiB, parse_bytes

    assert parse_bytes("80") == parse_bytes("80G") == parse_bytes("80 GiB") == 80 * GiB
    with pytest.raises(ValueError, match="cannot read --gpu-mem from 'eighty': give a size such as 80GiB"):
        parse_bytes("eighty", "--gpu-mem")
    args = ("--config", "mgpt4_dist/configs/stage1_vicuna7b.yaml", "--llm", "7b", "--gpu-mem")
    result = json.loads(run_plan(*args, "80", "--json").stdout)
    assert result["gpu_mem"] == 80 * GiB and any(r["fits"] for r in result["rows"])
    out = run_plan(*args, "4GiB").stdout  # only the fully offloaded choice fits
    assert "recommended: zero3+off-opt+params with train.micro_batch_size=" in out
    assert "(largest that fits with offload: nothing fits without it;" in out
    out = run_plan(*args, "2GiB").stdout
    assert "recommended:" not in out
    assert "nothing fits in 2.00 GiB per GPU, not even zero3+off-opt+params at micro batch 1, which needs 2.3 GiB" in out
