"""`mgpt4-export`: the trained projection of a run or checkpoint as one file.

    mgpt4-export RUN_DIR --format minigpt4 --out pretrained_minigpt4.pth   # the original demo.py's ckpt
    mgpt4-export RUN_DIR/checkpoints/step_00000500 --format safetensors --out proj.safetensors

The formats are written by `mgpt4_dist.export.proj_file`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from mgpt4_dist.cli import ArgumentParser, examples, user_errors

PROG = "mgpt4-export"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="The trained projection (llama_proj) of a run or checkpoint as one file.",
        epilog=examples("mgpt4-export RUN_DIR --format minigpt4 --out pretrained_minigpt4.pth",
                        "mgpt4-export RUN_DIR/checkpoints/step_00000500 --format safetensors --out proj.safetensors"))
    p.add_argument("checkpoint", help="RUN_DIR, RUN_DIR/checkpoints/latest or a step_NNNNNNNN folder")
    p.add_argument("--format", choices=("minigpt4", "safetensors"), default="minigpt4",
                   help="minigpt4: the original demo.py's {'model': ...} .pth; safetensors: the same tensors with "
                        "the model config in the file's metadata")
    p.add_argument("--out", required=True, help="output file (not a folder)")
    return p


# FileNotFoundError: checkpoint.layout.resolve_step_dir reports a missing checkpoint path with it.
@user_errors(PROG, also=(FileNotFoundError,))
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from mgpt4_dist.export.proj_file import export_proj_file

    result = export_proj_file(args.checkpoint, args.format, args.out)
    print(f"exported {result['step_dir']} -> {args.out} ({args.format}): "
          + ", ".join(f"{k} {v}" for k, v in result["tensors"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
