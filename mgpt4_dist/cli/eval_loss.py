"""`mgpt4-eval-loss`: the training loss of given answers for given images (a contract: checks
outside the package call exactly this).

    mgpt4-eval-loss --config CONFIG.yaml [key=value ...] --images IMAGES --answers ANSWERS.json \\
        [--instruction TEXT] [--json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from mgpt4_dist.cli import ArgumentParser, examples, user_errors
from mgpt4_dist.config import load_config

PROG = "mgpt4-eval-loss"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Loss of the given answers for the given images, through the same sequence and loss code "
                    "as training (fp32 on CPU unless the config says otherwise). No shards or run dir needed.",
        epilog=examples("mgpt4-eval-loss --config mgpt4_dist/configs/tiny_stage1.yaml model.llm_path=tiny/llm "
                        "--images a.jpg,b.jpg --answers answers.json --json"))
    p.add_argument("--config", required=True, help="YAML config (model.*, data.max_txt_len, data.end_sym, ...)")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    p.add_argument("--images", required=True,
                   help="image files (comma-separated), a directory of images, or a .pt float tensor [B,3,H,W] "
                        "already normalized")
    p.add_argument("--answers", required=True, help="JSON file: a list of B answer strings (used verbatim)")
    p.add_argument("--instruction", default=None,
                   help="raw instruction with <ImageHere>, formatted with data.prompt_template "
                        "(default: one of data.prompts, or none: stage 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def read_answers(path: str) -> List[str]:
    """--answers: a JSON list of strings; anything else is one error line naming the file."""
    from mgpt4_dist.errors import InvalidInputError, MissingFileError

    try:
        with open(path, encoding="utf-8") as f:
            answers = json.load(f)
    except FileNotFoundError:
        raise MissingFileError(f"--answers {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"--answers {path}: not valid JSON ({e}); expected a JSON list of answer "
                                f"strings, e.g. [\"a red square\", \"a blue circle\"]") from None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise InvalidInputError(f"--answers {path}: expected a JSON list of strings, got "
                                f"{type(answers).__name__}" + (" with non-string items" if isinstance(answers, list)
                                                               else ""))
    return answers


@user_errors(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import torch

    from mgpt4_dist.eval_loss import eval_loss, load_images
    from mgpt4_dist.inference.loader import check_device

    cfg = load_config(args.config, args.overrides)
    answers = read_answers(args.answers)
    check_device(args.device)
    images = load_images(args.images, cfg.model.vit.img_size)
    result = eval_loss(cfg, images, answers, args.instruction, device=args.device)
    if args.json:
        print(json.dumps({k: result[k] for k in ("loss", "num_scored_tokens", "per_sample_token_ce")}))
    else:
        print(f"loss {result['loss']:.6f} over {result['num_scored_tokens']} scored tokens "
              f"({len(answers)} samples{', instruction: ' + repr(result['instruction']) if result['instruction'] else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
