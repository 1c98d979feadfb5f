"""Step time, samples/s and peak RSS per rank of every engine on the same small model, 2 processes.

    python tools/bench_engines.py --steps 8 --write

The "small" model is larger than the test preset but CPU-friendly: LLM hidden 256, 4 layers,
intermediate 688; ViT width 128, 4 blocks; Q-Former width 128, 2 layers (random ViT/Q-Former,
seeded). Each configuration runs `mgpt4-train` under torchrun (gloo, OMP_NUM_THREADS=1); the
step time is the median of the logged steps after the first two (warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CONFIGS = {
    "deepspeed ZeRO-0": ["parallel.zero_stage=0"],
    "deepspeed ZeRO-1": ["parallel.zero_stage=1"],
    "deepspeed ZeRO-2": ["parallel.zero_stage=2"],
    "deepspeed ZeRO-3": ["parallel.zero_stage=3"],
    "deepspeed ZeRO-3 + offload optimizer+params": ["parallel.zero_stage=3", "parallel.offload=optimizer+params"],
    "fsdp2": ["parallel.backend=fsdp"],
}


def build_small_assets(out: str) -> list:
    from mgpt4_dist.tiny.assets import build_tiny_assets, build_tiny_llm

    paths = build_tiny_assets(os.path.join(out, "tiny"), num_samples=256, samples_per_shard=64, pretrained=False)
    llm = os.path.join(out, "small_llm")
    if not os.path.isdir(llm):
        build_tiny_llm(llm, paths["llm_path"], hidden_size=256,
                       num_layers=4, num_heads=4, intermediate_size=688)
    return [f"model.llm_path={llm}", f"data.shards=[{os.path.abspath(paths['shards_pattern'])}]",
            "model.vit.embed_dim=128", "model.vit.depth=4", "model.vit.num_heads=4",
            "model.qformer.hidden_size=128", "model.qformer.num_heads=4", "model.qformer.intermediate_size=256",
            "model.allow_random_weights=true"]  # random towers of the benchmark's shapes


def run_one(overrides: list, extra: list, steps: int, micro: int, run_dir: str, port: int) -> dict:
    cmd = [os.path.join(BIN, "torchrun"), "--nproc-per-node", "2", "--master-port", str(port), "-m", "mgpt4_dist.train",
           "--config", os.path.join(REPO, "mgpt4_dist", "configs", "tiny_stage1.yaml"), *overrides, *extra,
           f"run_dir={run_dir}", f"train.max_steps={steps}", "train.log_every=1", f"train.micro_batch_size={micro}",
           "data.num_workers=0", "checkpoint.every_steps=100000", "logging.tensorboard=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    timed = rows[2:] or rows
    step = statistics.median(r["step_time_s"] for r in timed)
    return {"step_time_s": step, "samples_per_s": 2 * micro / step,
            "peak_rss_mib": max(r["max_mem_bytes"] for r in rows) / 2 ** 20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mgpt4_bench_engines"))
    p.add_argument("--write", action="store_true", help="replace the 'Engines' section of BENCHMARKS.md")
    args = p.parse_args(argv)
    overrides = build_small_assets(args.work)
    results = {}
    for i, (name, extra) in enumerate(CONFIGS.items()):
        results[name] = run_one(overrides, extra, args.steps, args.micro, os.path.join(args.work, f"run{i}"), 29700 + i)
        print(name, results[name], flush=True)
    import torch

    lines = ["## Engines", "",
             f"`python tools/bench_engines.py --steps {args.steps} --micro {args.micro} --write`", "",
             f"CPU ({os.cpu_count()} cores), {platform.platform()}, Python {platform.python_version()}, "
             f"torch {torch.__version__}; 2 processes (gloo), fp32, small model (LLM 256x4, ViT 128x4, Q-Former "
             f"128x2), micro batch {args.micro} per rank; median step of steps 3-{args.steps}. Peak RSS is the "
             "largest rank's ru_maxrss (includes the Python/torch/DeepSpeed runtime).", "",
             "| engine | step time (s) | samples/s | peak RSS per rank (MiB) |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_time_s']:.3f} | {r['samples_per_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        path = os.path.join(REPO, "BENCHMARKS.md")
        text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
        start = text.find("## Engines")
        if start >= 0:
            end = text.find("\n## ", start + 1)
            text = text[:start] + table + (text[end + 1:] if end >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + table
        with open(path, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
