"""`mgpt4-export`: the trained projection of a run or checkpoint as one file.

    mgpt4-export RUN_DIR --format minigpt4 --out pretrained_minigpt4.pth   # the original demo.py's ckpt
    mgpt4-export RUN_DIR/checkpoints/step_00000500 --format safetensors --out proj.safetensors

`minigpt4`: `{'model': {'llama_proj.weight', 'llama_proj.bias'}}`, fp32 (what the original
`demo.py` / `eval_configs/*.yaml ckpt:` loads). `safetensors`: the same tensors with the model
config (JSON) in the file's metadata under `mgpt4_config`. Both load back through
`model.proj_checkpoint`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

from mgpt4_dist.cli import ArgumentParser, examples, user_errors
from mgpt4_dist.errors import InvalidInputError


def export(checkpoint: str, fmt: str, out: str) -> dict:
    from safetensors.torch import save_file

    from mgpt4_dist.trainable_state import TrainableState
    from mgpt4_dist.consolidate import inference_config, read_meta, read_run_config, resolve_step_dir, write_minigpt4_pth

    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        name = "pretrained_minigpt4.pth" if fmt == "minigpt4" else "llama_proj.safetensors"
        raise InvalidInputError(f"--out {out}: a folder; --out takes the file to write, "
                                f"e.g. --out {os.path.join(out, name)}")
    step_dir = resolve_step_dir(checkpoint)
    cfg = read_run_config(step_dir)
    tensors = TrainableState(step_dir).tensors("fp32")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"--out {out}: cannot create its folder ({e.strerror})") from None
    if fmt == "minigpt4":
        write_minigpt4_pth(tensors, out)
    else:
        meta = {"format": "pt", "mgpt4_config": json.dumps(inference_config(cfg, read_meta(step_dir).get("step"),
                                                                             step_dir, False))}
        tmp = out + ".tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, out)
    return {"step_dir": step_dir, "tensors": {k: list(v.shape) for k, v in tensors.items()}}


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


# FileNotFoundError: consolidate.resolve_step_dir reports a missing checkpoint path with it.
@user_errors(PROG, also=(FileNotFoundError,))
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result = export(args.checkpoint, args.format, args.out)
    print(f"exported {result['step_dir']} -> {args.out} ({args.format}): "
          + ", ".join(f"{k} {v}" for k, v in result["tensors"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
