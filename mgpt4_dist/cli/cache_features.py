"""`mgpt4-cache-features --config CONFIG.yaml [key=value ...] --out DIR`: precompute vision features."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from mgpt4_dist.config import ConfigError, load_config


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="mgpt4-cache-features",
        description="Run the frozen ViT + Q-Former once over data.shards and write feature shards; then train "
                    "with data.shards=[DIR/*.tar] data.features=true to skip the vision towers.")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides (model.*, data.shards)")
    p.add_argument("--out", required=True, help="output folder for the feature shards")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="stored precision (the original runs the towers in fp16)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from mgpt4_dist.cache_features import cache_features
    from mgpt4_dist.models.loading import CheckpointMismatchError

    try:
        report = cache_features(load_config(args.config, args.overrides), args.out, args.batch_size, args.dtype,
                                args.device)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointMismatchError) as e:
        print(f"mgpt4-cache-features: error: {e}", file=sys.stderr)
        return 2
    print(f"cached features of {report.samples} samples ({report.skipped} skipped) into {len(report.shards)} "
          f"shards in {report.out_dir}; train with data.shards=[{report.out_dir}/*.tar] data.features=true")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
