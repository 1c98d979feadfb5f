"""`mgpt4-apply-delta --base LLAMA_HF_DIR --delta VICUNA_DELTA_DIR --out DIR`: Vicuna v0 weights."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mgpt4-apply-delta",
                                description="Build Vicuna v0 working weights: every tensor = base + delta, config and "
                                            "tokenizer from the delta; streams one shard at a time.")
    p.add_argument("--base", required=True, help="Hugging Face LLaMA folder (sharded .bin or safetensors)")
    p.add_argument("--delta", required=True, help="Vicuna delta folder")
    p.add_argument("--out", required=True, help="output folder (safetensors shards + index)")
    args = p.parse_args(argv)
    from mgpt4_dist.weights import apply_delta

    try:
        result = apply_delta(args.base, args.delta, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"mgpt4-apply-delta: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result['tensors']} tensors in {result['shards']} shard(s) to {result['out']} "
          f"(+ {', '.join(result['copied'])} from the delta)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
