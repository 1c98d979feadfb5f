"""`mgpt4-plan`: per-rank memory of a configured run for every ZeRO stage / offload choice and FSDP.

    mgpt4-plan --config mgpt4_dist/configs/stage1_vicuna7b.yaml --gpus-per-node 8 --nodes 1 --gpu-mem 80GiB
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from mgpt4_dist.config import ConfigError, load_config
from mgpt4_dist.plan import BUILTIN_LLMS, format_plan, parse_bytes, plan


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mgpt4-plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for mgpt4-train")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", default="80GiB",
                   help="memory of one GPU: 80GiB, 80G or 80 (a bare number is GiB), 40GB (10^9 bytes), 81920MiB")
    p.add_argument("--llm", choices=sorted(BUILTIN_LLMS), default=None,
                   help="LLM shape when model.llm_path has no config.json (Vicuna v0 7B/13B)")
    p.add_argument("--overhead", default="2GiB", help="allowance per rank for CUDA context, buffers, fragmentation")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = plan(cfg, args.gpus_per_node * args.nodes, parse_bytes(args.gpu_mem, "--gpu-mem"), llm=args.llm,
                      overhead=parse_bytes(args.overhead, "--overhead"))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"mgpt4-plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
