"""`mgpt4-make-tiny-assets`: the command-line front of `mgpt4_dist.tiny.assets.build_tiny_assets`.

Progress goes to stderr; stdout gets one summary line and then the `overrides:` line to paste
after a tiny config, so scripts can take the last line of stdout.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from mgpt4_dist.tiny.assets import build_tiny_assets, tiny_overrides  # imports nothing heavy at module level
from mgpt4_dist.cli import ArgumentParser, examples, user_errors
from mgpt4_dist.errors import InvalidInputError

PROG = "mgpt4-make-tiny-assets"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def out_dir_problem(out: str) -> Optional[str]:
    """Why `out` cannot become our folder, found before any slow import; None if it can."""
    if os.path.exists(out):
        return None if os.path.isdir(out) else "exists and is not a directory"
    ancestor = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    return None if os.path.isdir(ancestor) else f"{ancestor} is not a directory"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        epilog=examples("mgpt4-make-tiny-assets --out tiny/",
                        "mgpt4-train --config mgpt4_dist/configs/tiny_stage1.yaml $(mgpt4-make-tiny-assets --out tiny/ "
                        "| tail -1 | cut -d' ' -f2-) run_dir=/tmp/r"),
        description="Write a tiny MiniGPT-4 setup (tokenizer + LLaMA folder, EVA ViT and Q-Former weight "
                    "files in the original layouts, synthetic WebDataset shards) and print the config overrides "
                    "that use it. The LLaMA and Q-Former are pretrained stand-ins (about two minutes on 2 "
                    "cores the first time, then copied from the cache in $MGPT4_CACHE_DIR or ~/.cache/mgpt4_dist), "
                    "so a stage-1 run learns to use the image. Reruns with the same options reuse the folder.")
    parser.add_argument("--out", required=True, help="folder to write (created if missing)")
    parser.add_argument("--num-samples", type=_positive_int, default=256, help="synthetic image-text pairs")
    parser.add_argument("--samples-per-shard", type=_positive_int, default=64, help="samples per .tar shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random asset")
    parser.add_argument("--random", action="store_true",
                        help="random LLaMA and Q-Former instead of the pretrained stand-ins (nothing to learn; "
                             "for tests of loaders and file layouts)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    return parser


@user_errors(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    problem = out_dir_problem(args.out)
    if problem:
        raise InvalidInputError(f"--out {args.out}: {problem}; choose another folder")

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        paths = build_tiny_assets(args.out, num_samples=args.num_samples, samples_per_shard=args.samples_per_shard,
                                  seed=args.seed, pretrained=not args.random, force=args.force, progress=True)
    except OSError as e:
        # e.g. --out not writable, or a full disk: a usage problem, not a crash.
        raise InvalidInputError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    kind = "random" if args.random else "pretrained"
    print(f"tiny assets in {os.path.abspath(args.out)} ({kind} stand-ins): LLaMA folder {paths['llm_path']}, "
          f"ViT {paths['vit_checkpoint']}, Q-Former {paths['qformer_checkpoint']}, "
          f"{args.num_samples} samples in {paths['shards_pattern']}")
    print("overrides: " + " ".join(tiny_overrides(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
