"""`mgpt4-export`: the trained projection of a run or checkpoint as one file, or the whole model
as a Hugging Face transformers folder.

    mgpt4-export RUN_DIR --format minigpt4 --out pretrained_minigpt4.pth   # the original demo.py's ckpt
    mgpt4-export RUN_DIR/checkpoints/step_00000500 --format safetensors --out proj.safetensors
    mgpt4-export RUN_DIR --format hf --out minigpt4-hf/                    # Blip2ForConditionalGeneration
    mgpt4-export --format hf --config stage2_vicuna7b.yaml model.proj_checkpoint=pretrained_minigpt4.pth --out hf/

`minigpt4`: `{'model': {'llama_proj.weight', 'llama_proj.bias'}}`, fp32 (what the original
`demo.py` / `eval_configs/*.yaml ckpt:` loads). `safetensors`: the same tensors with the model
config (JSON) in the file's metadata under `mgpt4_config`. Both load back through
`model.proj_checkpoint`. `hf`: see `mgpt4_dist.export.hf` (a run, step or consolidated folder, or
the original weight files named by a config). `minigpt4` and `safetensors` are written by `mgpt4_dist.export.proj_file`.
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
        description="The trained projection (llama_proj) of a run or checkpoint as one file, or (--format hf) the "
                    "whole model as a folder that transformers' Blip2ForConditionalGeneration and AutoProcessor load.",
        epilog=examples("mgpt4-export RUN_DIR --format minigpt4 --out pretrained_minigpt4.pth",
                        "mgpt4-export RUN_DIR/checkpoints/step_00000500 --format safetensors --out proj.safetensors",
                        "mgpt4-export RUN_DIR --format hf --out minigpt4-hf/",
                        "mgpt4-export --format hf --config mgpt4_dist/configs/stage2_vicuna7b.yaml "
                        "model.proj_checkpoint=pretrained_minigpt4.pth --out minigpt4-hf/"))
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="RUN_DIR, RUN_DIR/checkpoints/latest or a step_NNNNNNNN folder (hf: also a folder written by "
                        "mgpt4-consolidate); with --config: key=value overrides instead")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of --config")
    p.add_argument("--format", choices=("minigpt4", "safetensors", "hf"), default="minigpt4",
                   help="minigpt4: the original demo.py's {'model': ...} .pth; safetensors: the same tensors with "
                        "the model config in the file's metadata; hf: a transformers folder (config, sharded "
                        "safetensors, tokenizer, image processor, chat template)")
    p.add_argument("--out", required=True, help="output file (minigpt4, safetensors) or new folder (hf)")
    p.add_argument("--config", default=None,
                   help="hf from the original weight files: a YAML config whose model.* name them "
                        "(vit_checkpoint, qformer_checkpoint, proj_checkpoint, llm_path)")
    p.add_argument("--max-shard-size", default="5GB", help="hf: largest safetensors shard (e.g. 5GB, 500MB)")
    return p


def parse_size(text: str) -> int:
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            try:
                return int(float(upper[: -len(unit)]) * factor)
            except ValueError:
                break
    raise InvalidInputError(f"--max-shard-size {text}: give a size such as 5GB, 500MB or 2GiB")


def export_hf_cli(args) -> int:
    from mgpt4_dist.config import load_config
    from mgpt4_dist.export.hf import export_hf

    cfg = None
    if args.config:
        cfg = load_config(args.config, ([args.checkpoint] if args.checkpoint else []) + args.overrides)
        checkpoint = None
    else:
        if args.overrides:
            raise InvalidInputError(f"unexpected arguments {' '.join(args.overrides)}: key=value overrides need --config")
        if not args.checkpoint:
            raise InvalidInputError("give a run, step or consolidated folder, or --config naming the original weights")
        checkpoint = args.checkpoint
    result = export_hf(checkpoint, args.out, cfg=cfg, shard_bytes=parse_size(args.max_shard_size))
    weights = [f for f in result["files"] if f.endswith(".safetensors")]
    print(f"exported {result['source']} -> {args.out} (transformers Blip2ForConditionalGeneration): "
          f"{result['tensors']} tensors, {result['bytes'] / 2 ** 20:.1f} MiB in {len(weights)} safetensors file(s), "
          f"tokenizer, image processor, chat template", flush=True)
    return 0


# FileNotFoundError: checkpoint.layout.resolve_step_dir reports a missing checkpoint path with it.
@user_errors(PROG, also=(FileNotFoundError,))
def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.format == "hf":
        return export_hf_cli(args)
    if not args.checkpoint or args.overrides or args.config:
        parser.error(f"--format {args.format} takes one checkpoint folder (and no --config)")
    from mgpt4_dist.export.proj_file import export_proj_file

    result = export_proj_file(args.checkpoint, args.format, args.out)
    print(f"exported {result['step_dir']} -> {args.out} ({args.format}): "
          + ", ".join(f"{k} {v}" for k, v in result["tensors"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
