"""`mgpt4-eval`: loss, BLEU-4, CIDEr-D and generated captions of a trained model on shards with
reference captions (one or several per image: `caption`, or `captions` in KEY.json).

    mgpt4-eval --model RUN_OR_STEP_OR_CONSOLIDATED_DIR --shards 'coco_karpathy_test/*.tar' \\
        [--max-samples N] [--json] [--out captions.jsonl]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from mgpt4_dist.cli import ArgumentParser, examples, user_errors

PROG = "mgpt4-eval"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Evaluate a trained model on shards whose samples carry reference captions: the training "
                    "loss of the captions, greedy captions, and their BLEU-4 and CIDEr-D (pycocoevalcap, the "
                    "[eval] extra). One process, fp32 on CPU unless --device says otherwise.",
        epilog=examples("mgpt4-eval --model runs/tiny_stage1 --shards 'heldout/*.tar' --out captions.jsonl",
                        "mgpt4-eval --model consolidated/ --shards 'coco_karpathy_test/{000..004}.tar' "
                        "--max-samples 500 --json"))
    p.add_argument("--model", required=True,
                   help="a run folder (its latest checkpoint), a step folder, or a folder written by mgpt4-consolidate")
    p.add_argument("--shards", required=True, help="shard pattern (braces and globs), as mgpt4-make-shards writes them")
    p.add_argument("--max-samples", type=int, default=5000, help="evaluate the first N usable samples")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward")
    p.add_argument("--max-new-tokens", type=int, default=30, help="greedy decoding length of the captions")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--out", default=None, help="write the captions as JSON lines (key, caption, references)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary line")
    return p


@user_errors(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from mgpt4_dist.errors import InvalidInputError
    from mgpt4_dist.evaluation.offline import evaluate_model
    from mgpt4_dist.inference.loader import check_device

    for name in ("max_samples", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1")
    check_device(args.device)
    result = evaluate_model(args.model, args.shards, args.max_samples, args.out, args.batch_size,
                            args.max_new_tokens, args.device)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "captions"}))
    else:
        print(f"{PROG}: {result['samples']} samples from {result['shards']} shard(s)"
              f"{' (' + str(result['skipped']) + ' skipped)' if result['skipped'] else ''}: loss {result['loss']:.4f} "
              f"over {result['tokens']} tokens, BLEU-4 {result['bleu4']:.4f}, CIDEr-D {result['cider']:.4f}"
              + (f"; wrote captions to {result['out']}" if result["out"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
