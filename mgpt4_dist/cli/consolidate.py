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

from mgpt4_dist.cli import ArgumentParser, examples, user_errors

PROG = "mgpt4-consolidate"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Write model.safetensors (trained llama_proj, fp32), config.json/config.yaml and minigpt4.pth "
                    "(the original {'model': ...} format) from a training checkpoint of any engine (DeepSpeed ZeRO "
                    "0-3, FSDP2) and world size, read from its step folder's trainable_state.safetensors.",
        epilog=examples("mgpt4-consolidate RUN_DIR/checkpoints/step_00001000 --out exported/",
                        "mgpt4-consolidate RUN_DIR --out exported/ --full   # self-contained: every frozen weight too"))
    p.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_NNNNNNNN, RUN_DIR/checkpoints/latest, or RUN_DIR")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--full", action="store_true",
                   help="also write every frozen weight (sharded safetensors + index, LLM config and tokenizer): "
                        "a self-contained folder")
    p.add_argument("--shard-size-gb", type=float, default=2.0, help="shard size for --full, in GiB")
    return p


# FileNotFoundError: checkpoint.layout.resolve_step_dir reports a missing checkpoint path with it.
@user_errors(PROG, also=(FileNotFoundError,))
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from mgpt4_dist.export.consolidate import consolidate

    result = consolidate(args.checkpoint, args.out, full=args.full, shard_bytes=int(args.shard_size_gb * 1024 ** 3))
    print(f"consolidated {result['step_dir']} -> {args.out}: " +
          ", ".join(f"{k} {v}" for k, v in result["tensors"].items()) + f"; wrote {', '.join(result['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
