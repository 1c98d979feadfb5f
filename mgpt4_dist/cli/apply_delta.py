"""`mgpt4-apply-delta --base LLAMA_HF_DIR --delta VICUNA_DELTA_DIR --out DIR`: Vicuna v0 weights."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mgpt4_dist.cli import ArgumentParser, examples, user_errors

PROG = "mgpt4-apply-delta"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG,
                       description="Build Vicuna v0 working weights: every tensor = base + delta, config and "
                                   "tokenizer from the delta; streams one shard at a time.",
                       epilog=examples("mgpt4-apply-delta --base llama-7b-hf/ --delta vicuna-7b-delta-v0/ "
                                       "--out vicuna-7b-v0/"))
    p.add_argument("--base", required=True, help="Hugging Face LLaMA folder (sharded .bin or safetensors)")
    p.add_argument("--delta", required=True, help="Vicuna delta folder")
    p.add_argument("--out", required=True, help="output folder (safetensors shards + index)")
    return p


@user_errors(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mgpt4_dist.models.weights import apply_delta

    result = apply_delta(args.base, args.delta, args.out)
    print(f"wrote {result['tensors']} tensors in {result['shards']} shard(s) to {result['out']} "
          f"(+ {', '.join(result['copied'])} from the delta)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
