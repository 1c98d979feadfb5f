"""`mgpt4-cache-features --config CONFIG.yaml [key=value ...] --out DIR`: precompute vision features."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from mgpt4_dist.cli import ArgumentParser, examples, user_errors
from mgpt4_dist.config import load_config

PROG = "mgpt4-cache-features"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Run the frozen ViT + Q-Former once over data.shards and write feature shards; then train "
                    "with data.shards=[DIR/*.tar] data.features=true to skip the vision towers.",
        epilog=examples("mgpt4-cache-features --config mgpt4_dist/configs/stage1_vicuna7b.yaml --out features/",
                        "mgpt4-train --config mgpt4_dist/configs/stage1_vicuna7b.yaml "
                        "'data.shards=[features/*.tar]' data.features=true"))
    p.add_argument("--config", required=True, help="YAML config (model.*, data.shards)")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides (model.*, data.shards)")
    p.add_argument("--out", required=True,
                   help="output folder for the feature shards, or an object-store URL (s3://bucket/prefix; each "
                        "shard is uploaded when complete)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="stored precision (the original runs the towers in fp16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    return p


@user_errors(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import torch

    from mgpt4_dist.cache_features import cache_features
    from mgpt4_dist.inference.loader import check_device

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    report = cache_features(load_config(args.config, args.overrides), args.out, args.batch_size, args.dtype, device)
    print(f"cached features of {report.samples} samples ({report.skipped} skipped) into {len(report.shards)} "
          f"shards in {report.out_dir}; train with data.shards=[{report.out_dir}/*.tar] data.features=true")
    return 0


if __name__ == "__main__":
    sys.exit(main())
