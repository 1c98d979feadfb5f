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


def export(checkpoint: str, fmt: str, out: str) -> dict:
    from safetensors.torch import save_file

    from mgpt4_dist.trainable_state import TrainableState
    from mgpt4_dist.consolidate import inference_config, read_meta, read_run_config, resolve_step_dir, write_minigpt4_pth

    step_dir = resolve_step_dir(checkpoint)
    cfg = read_run_config(step_dir)
    tensors = TrainableState(step_dir).tensors("fp32")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if fmt == "minigpt4":
        write_minigpt4_pth(tensors, out)
    else:
        meta = {"format": "pt", "mgpt4_config": json.dumps(inference_config(cfg, read_meta(step_dir).get("step"),
                                                                             step_dir, False))}
        tmp = out + ".tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, out)
    return {"step_dir": step_dir, "tensors": {k: list(v.shape) for k, v in tensors.items()}}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mgpt4-export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="RUN_DIR, RUN_DIR/checkpoints/latest or a step_NNNNNNNN folder")
    p.add_argument("--format", choices=("minigpt4", "safetensors"), default="minigpt4")
    p.add_argument("--out", required=True, help="output file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from mgpt4_dist.consolidate import CheckpointFormatError

    try:
        result = export(args.checkpoint, args.format, args.out)
    except (CheckpointFormatError, FileNotFoundError, ValueError) as e:
        print(f"mgpt4-export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {result['step_dir']} -> {args.out} ({args.format}): "
          + ", ".join(f"{k} {v}" for k, v in result["tensors"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
