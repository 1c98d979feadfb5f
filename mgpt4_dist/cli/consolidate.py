"""`mgpt4-consolidate`: a training checkpoint (DeepSpeed ZeRO 0-3 or FSDP2, any world size) → fp32
inference folder, without a GPU or process group.

    mgpt4-consolidate RUN_DIR/checkpoints/step_00001000 --out exported/
    mgpt4-consolidate RUN_DIR/checkpoints/latest --out exported/ --full
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="mgpt4-consolidate",
        description="Write model.safetensors (trained llama_proj, fp32), config.json/config.yaml and minigpt4.pth "
                    "(the original {'model': ...} format) from a training checkpoint of any engine (DeepSpeed ZeRO "
                    "0-3, FSDP2) and world size, read from its step folder's trainable_state.safetensors.")
    p.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_NNNNNNNN, RUN_DIR/checkpoints/latest, or RUN_DIR")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--full", action="store_true",
                   help="also write every frozen weight (sharded safetensors + index, LLM config and tokenizer): "
                        "a self-contained folder")
    p.add_argument("--shard-size-gb", type=float, default=2.0, help="shard size for --full (default 2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from mgpt4_dist.consolidate import CheckpointFormatError, consolidate

    try:
        result = consolidate(args.checkpoint, args.out, full=args.full,
                             shard_bytes=int(args.shard_size_gb * 1024 ** 3))
    except (CheckpointFormatError, FileNotFoundError, ValueError) as e:
        print(f"mgpt4-consolidate: error: {e}", file=sys.stderr)
        return 2
    print(f"consolidated {result['step_dir']} -> {args.out}: " +
          ", ".join(f"{k} {v}" for k, v in result["tensors"].items()) + f"; wrote {', '.join(result['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
