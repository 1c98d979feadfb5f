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

from mgpt4_dist.config import ConfigError, load_config


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="mgpt4-eval-loss",
        description="Loss of the given answers for the given images, through the same sequence and loss code "
                    "as training (fp32 on CPU unless the config says otherwise). No shards or run dir needed.")
    p.add_argument("--config", required=True, help="YAML config (model.*, data.max_txt_len, data.end_sym, ...)")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    p.add_argument("--images", required=True,
                   help="image files (comma-separated), a directory of images, or a .pt float tensor [B,3,H,W] "
                        "already normalized")
    p.add_argument("--answers", required=True, help="JSON file: a list of B answer strings (used verbatim)")
    p.add_argument("--instruction", default=None,
                   help="raw instruction with <ImageHere>, formatted with data.prompt_template; "
                        "default: data.prompts, or none (stage 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from mgpt4_dist.eval_loss import eval_loss, load_images
    from mgpt4_dist.models.loading import CheckpointMismatchError

    try:
        cfg = load_config(args.config, args.overrides)
        with open(args.answers) as f:
            answers = json.load(f)
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{args.answers}: expected a JSON list of strings")
        images = load_images(args.images, cfg.model.vit.img_size)
        result = eval_loss(cfg, images, answers, args.instruction, device=args.device)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointMismatchError) as e:
        print(f"mgpt4-eval-loss: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: result[k] for k in ("loss", "num_scored_tokens", "per_sample_token_ce")}))
    else:
        print(f"loss {result['loss']:.6f} over {result['num_scored_tokens']} scored tokens "
              f"({len(answers)} samples{', instruction: ' + repr(result['instruction']) if result['instruction'] else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
