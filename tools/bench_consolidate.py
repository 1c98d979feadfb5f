"""Consolidation cost: `mgpt4-consolidate` vs DeepSpeed's `zero_to_fp32` vs copying the same bytes.

    python tools/bench_consolidate.py [--work DIR] [--write]

Makes a real ZeRO-2 checkpoint of a few hundred MB with 2 ranks: the Llama-2 variant's projection
(5632 -> 4096, 23 M trainable parameters, as in MiniGPT-4 Llama-2 7B) on a 1-layer LLM of width
4096, one training step. Then each tool runs in a fresh process; wall time and the process's
peak RSS (VmHWM) are reported, next to a process that only imports torch (the floor).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_md import machine_line, write_section  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

# VmHWM (not ru_maxrss, which a child inherits from its parent across fork + exec on Linux).
MEASURE = r"""
import json, sys, time
start = time.perf_counter()
exec(compile(sys.argv[1], "<bench>", "exec"))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": int(hwm) / 1024}))
"""

TOOLS = {
    "import torch only (floor)": "import torch",
    "mgpt4-consolidate (streaming)":
        "from mgpt4_dist.export.consolidate import consolidate; consolidate(CKPT, OUT + '/ours')",
    "zero_to_fp32 (DeepSpeed)":
        "from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict as c; "
        "c(ROOT, OUT + '/ds', tag=TAG, exclude_frozen_parameters=True)",
    "copy the checkpoint's bytes": "import shutil; shutil.copytree(CKPT, OUT + '/copy')",
}


def make_checkpoint(work: str) -> str:
    from mgpt4_dist.tiny.assets import build_tiny_assets, build_tiny_llm, build_tiny_vit_checkpoint

    paths = build_tiny_assets(os.path.join(work, "assets"), num_samples=32, samples_per_shard=16, pretrained=False)
    llm = build_tiny_llm(os.path.join(work, "llm4096"), paths["llm_path"], hidden_size=4096, num_layers=1,
                         num_heads=32, intermediate_size=128)
    vit = build_tiny_vit_checkpoint(os.path.join(work, "vit1408.pth"), embed_dim=1408, depth=1, num_heads=16)
    run_dir = os.path.join(work, "run")
    cmd = [os.path.join(BIN, "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "mgpt4_dist.train",
           "--config", os.path.join(REPO, "mgpt4_dist/configs/tiny_stage1.yaml"), f"run_dir={run_dir}",
           f"model.llm_path={llm}", f"model.vit_checkpoint={vit}", "model.qformer_checkpoint=",
           "model.has_qformer=false", "model.vit.embed_dim=1408", "model.vit.depth=1", "model.vit.num_heads=16",
           f"data.shards=[{paths['shards_pattern']}]", "data.num_workers=0", "train.max_steps=1",
           "train.micro_batch_size=2", "logging.tensorboard=false"]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    return os.path.join(run_dir, "checkpoints", "step_00000001")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--write", action="store_true", help="write the Consolidation section of BENCHMARKS.md")
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench_consolidate_")
    ckpt = os.path.join(work, "run", "checkpoints", "step_00000001")
    if not os.path.isdir(ckpt):
        ckpt = make_checkpoint(work)
    size_mb = dir_bytes(ckpt) / 2 ** 20
    rows = []
    for name, code in TOOLS.items():
        out = tempfile.mkdtemp(dir=work, prefix="out_")
        prelude = (f"CKPT={ckpt!r}; ROOT={os.path.dirname(ckpt)!r}; TAG={os.path.basename(ckpt)!r}; OUT={out!r}\n")
        proc = subprocess.run([sys.executable, "-c", MEASURE, prelude + code], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append((name, json.loads(proc.stdout.strip().splitlines()[-1])))
    table = ["| tool | time (s) | peak RSS (MB) |", "| --- | ---: | ---: |"]
    table += [f"| {n} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} |" for n, r in rows]
    body = (f"`python tools/bench_consolidate.py --write` on {machine_line()}.\n\n"
            f"A real 2-rank ZeRO-2 fp32 checkpoint of {size_mb:.0f} MB: the Llama-2 variant's projection "
            f"(5632 -> 4096, 23.1 M trainable parameters, the size of MiniGPT-4 Llama-2 7B's) after one step; "
            f"its files hold the fp32 weights in the module file and in the optimizer partitions, plus the two Adam "
            f"moments. Each tool runs in a fresh process; the floor row is a process that only imports torch.\n\n"
            + "\n".join(table) + "\n\n"
            "mgpt4-consolidate writes model.safetensors + minigpt4.pth (the 92 MB of weights twice) from the "
            "fp32 tensors of the step folder's trainable_state.safetensors (written whole by rank 0 at save time, "
            "for every engine): DeepSpeed's partitions are not read. zero_to_fp32 (one output file) merges the "
            "partitions and keeps the returned state dict. Copying is the I/O floor (no torch import).")
    print(body)
    if args.write:
        write_section("Consolidation", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
