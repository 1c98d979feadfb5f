"""`mgpt4-plan`: per-rank memory of a configured run for every ZeRO stage / offload choice and FSDP.

    mgpt4-plan --config mgpt4_dist/configs/stage1_vicuna7b.yaml --gpus-per-node 8 --nodes 1 --gpu-mem 80GiB
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from mgpt4_dist.cli import ArgumentParser, examples, user_errors
from mgpt4_dist.config import load_config
from mgpt4_dist.errors import InvalidInputError
from mgpt4_dist.plan import BUILTIN_LLMS, format_plan, parse_bytes, plan

PROG = "mgpt4-plan"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Per-rank memory of a configured run for every ZeRO stage / offload choice and FSDP, "
                    "and which fit the GPUs given.",
        epilog=examples("mgpt4-plan --config mgpt4_dist/configs/stage1_vicuna7b.yaml --gpus-per-node 8 --nodes 1 "
                        "--gpu-mem 80GiB",
                        "mgpt4-plan --config mgpt4_dist/configs/stage2_vicuna13b.yaml --llm 13b --gpu-mem 40GB --json"))
    p.add_argument("--config", required=True, help="YAML config, as for mgpt4-train")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for mgpt4-train")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--gpu-mem", default="80GiB",
                   help="memory of one GPU: 80GiB, 80G or 80 (a bare number is GiB), 40GB (10^9 bytes), 81920MiB")
    p.add_argument("--llm", choices=sorted(BUILTIN_LLMS), default=None,
                   help="LLM shape when model.llm_path has no config.json (Vicuna v0 7B/13B)")
    p.add_argument("--overhead", default="2GiB", help="allowance per rank for CUDA context, buffers, fragmentation")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _size(flag: str, text: str) -> int:
    try:
        return parse_bytes(text)
    except InvalidInputError as e:
        raise InvalidInputError(f"{flag}: {e}") from None


@user_errors(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    result = plan(cfg, args.gpus_per_node * args.nodes, _size("--gpu-mem", args.gpu_mem), llm=args.llm,
                  overhead=_size("--overhead", args.overhead))
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
