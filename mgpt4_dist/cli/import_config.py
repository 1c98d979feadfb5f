"""`mgpt4-import-config ORIGINAL.yaml --out OURS.yaml`: an original MiniGPT-4 config in our format."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mgpt4_dist.cli import ArgumentParser, examples, user_errors
from mgpt4_dist.config import save_config

PROG = "mgpt4-import-config"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG,
                       description="Turn an original MiniGPT-4 train_configs/eval_configs YAML into an "
                                   "mgpt4_dist config; prints what was mapped and what could not be.",
                       epilog=examples("mgpt4-import-config MiniGPT-4/train_configs/minigpt4_stage2_finetune.yaml "
                                       "--out stage2.yaml",
                                       "mgpt4-train --config stage2.yaml run_dir=runs/stage2"))
    p.add_argument("original", help="the original YAML (train_configs/*.yaml or eval_configs/*.yaml)")
    p.add_argument("--out", required=True, help="where to write our YAML")
    return p


@user_errors(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mgpt4_dist.import_config import import_original_file

    report = import_original_file(args.original)
    save_config(report.config, args.out)
    for src, dst, value in report.mapped:
        print(f"mapped   {src} -> {dst} = {value!r}")
    for src, why in report.ignored:
        print(f"ignored  {src}: {why}")
    for src, why in report.unmapped:
        print(f"NOT MAPPED {src}: {why}")
    print(f"wrote {args.out} ({len(report.mapped)} mapped, {len(report.ignored)} ignored, "
          f"{len(report.unmapped)} not mapped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
