"""Did a tiny stage-1 run learn to use the image? Held-out scenes, before and after training.

For synthetic scenes the run never saw (`mgpt4-make-shards --synthetic N --seed S`), with the
projection at its initial state (rebuilt from the run's seed, exactly as step 0 had it) and as
trained:

- caption loss of each scene's own caption and of another scene's (the next one's): a model that
  uses the image scores its own caption lower; at the initial projection the two must agree;
- greedy captions, and the attribute accuracy: the share of (foreground colour, shape, background
  colour) a caption names right, read with `tiny.scenes.caption_attributes`; chance is about 17 %.

`python -m mgpt4_dist.tiny.probe RUN --shards 'heldout/*.tar' [--out probe.json]`: a table of a few
captions and one summary line; the quickstart ends with it. Everything goes through the evaluation
passes of `mgpt4-eval` (one process, fp32, the training code's sequence layout).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Dict, List, Optional

from mgpt4_dist.errors import InvalidInputError
from mgpt4_dist.tiny.scenes import SYNTHETIC_COLOURS, SYNTHETIC_SHAPES, caption_attributes

if TYPE_CHECKING:
    import torch

    from mgpt4_dist.config import JobConfig
    from mgpt4_dist.evaluation.eval_set import EvalSet
    from mgpt4_dist.evaluation.evaluate import ModelCall
    from mgpt4_dist.models.sequence import SequenceBuilder

log = logging.getLogger(__name__)

ATTRIBUTES = ("fg", "shape", "bg")
# Guessing each attribute uniformly: fg 1/8, shape 1/4, bg 1/7 (it differs from fg).
CHANCE_ACCURACY = (1 / len(SYNTHETIC_COLOURS) + 1 / len(SYNTHETIC_SHAPES) + 1 / (len(SYNTHETIC_COLOURS) - 1)) / 3


def attribute_accuracy(captions: List[str], references: List[str]) -> float:
    """Share of the (fg, shape, bg) attributes of each reference that its caption names right."""
    right = total = 0
    for caption, reference in zip(captions, references):
        want, got = caption_attributes(reference), caption_attributes(caption)
        for name in ATTRIBUTES:
            if want[name] is not None:
                total += 1
                right += got[name] == want[name]
    return right / max(total, 1)


def _measure(model_call: "ModelCall", eval_set: "EvalSet", other_set: "EvalSet", builder: "SequenceBuilder",
             cfg: "JobConfig", device: "torch.device", batch_size: int) -> Dict[str, object]:
    from mgpt4_dist.evaluation.evaluate import caption_pass, loss_pass

    own, own_tokens = loss_pass(model_call, eval_set, 0, 1, builder, [], batch_size, device)
    other, other_tokens = loss_pass(model_call, other_set, 0, 1, builder, [], batch_size, device)
    captions = caption_pass(model_call, eval_set, len(eval_set), 0, 1, builder, None, 24, batch_size, device,
                            cfg.data.end_sym)
    ordered = [captions[s.index] for s in eval_set.samples]
    own_loss, other_loss = own / max(own_tokens, 1), other / max(other_tokens, 1)
    return {"own_caption_loss": own_loss, "other_caption_loss": other_loss, "own_tokens": own_tokens,
            "other_tokens": other_tokens,
            "gap": (other_loss - own_loss) / other_loss,
            "attribute_accuracy": attribute_accuracy(ordered, [s.references[0] for s in eval_set.samples]),
            "captions": ordered}


def probe_run(run: str, shards: str, max_samples: int = 64, batch_size: int = 16) -> Dict[str, object]:
    """Before/after figures for a stage-1 run (run, step or consolidated folder) on held-out shards."""
    import torch

    from mgpt4_dist.evaluation.eval_set import read_eval_set
    from mgpt4_dist.evaluation.offline import load_eval_model, read_model_config
    from mgpt4_dist.models.build import LocalBuild
    from mgpt4_dist.models.minigpt4 import init_llama_proj, initial_proj_seed
    from mgpt4_dist.models.sequence import SequenceBuilder

    cfg = read_model_config(run)
    if cfg.model.proj_checkpoint:
        # Its step 0 was that file's projection, which the seed does not rebuild.
        raise InvalidInputError(f"{run}: the run started from model.proj_checkpoint={cfg.model.proj_checkpoint}; "
                                "the probe compares against a projection at its random initial state (stage 1)")
    eval_set = read_eval_set([shards], max_samples, image_size=cfg.model.vit.img_size,
                             clean_captions=cfg.data.clean_captions, max_caption_words=cfg.data.max_caption_words,
                             features=False, what="--shards")
    if len(eval_set) < 2:
        raise InvalidInputError(f"--shards {shards}: need at least 2 samples to compare own and other captions")
    # Each scene scored with the next scene's caption.
    captions = [s.caption for s in eval_set.samples]
    other_set = dataclasses.replace(eval_set, samples=[
        dataclasses.replace(s, caption=captions[(i + 1) % len(captions)]) for i, s in enumerate(eval_set.samples)])
    bundle = load_eval_model(run, "cpu")
    model = bundle.model.eval()
    builder = SequenceBuilder(bundle.tokenizer, model.num_image_tokens, cfg.data.max_txt_len, cfg.data.end_sym,
                              cfg.model.max_context_len)

    def model_call(images, text, **kwargs):
        return model(images.float(), text, **kwargs)

    after = _measure(model_call, eval_set, other_set, builder, cfg, bundle.device, batch_size)
    init_llama_proj(model.llama_proj, initial_proj_seed(cfg.train.seed), LocalBuild())
    before = _measure(model_call, eval_set, other_set, builder, cfg, bundle.device, batch_size)
    return {"run": os.path.abspath(run), "shards": shards, "samples": len(eval_set), "chance": CHANCE_ACCURACY,
            "keys": [s.key for s in eval_set.samples], "references": [s.references[0] for s in eval_set.samples],
            "before": before, "after": after}


def pooled_gap(reports: List[Dict[str, object]], which: str) -> float:
    """The own-vs-other gap of several held-out sets taken as one (token-weighted), for `which` of
    "before" / "after": the gap at the initial projection is small, and more scenes measure it better."""
    own = sum(r[which]["own_caption_loss"] * r[which]["own_tokens"] for r in reports)
    other = sum(r[which]["other_caption_loss"] * r[which]["other_tokens"] for r in reports)
    own /= sum(r[which]["own_tokens"] for r in reports)
    other /= sum(r[which]["other_tokens"] for r in reports)
    return (other - own) / other


def format_report(report: Dict[str, object], show: int) -> List[str]:
    before, after = report["before"], report["after"]
    lines = []
    for i in range(min(show, report["samples"])):
        lines += [f"  image {report['keys'][i]}: {report['references'][i]}",
                  f"    before training: {before['captions'][i]!r}",
                  f"    after training:  {after['captions'][i]!r}"]
    for name, figures in (("before", before), ("after", after)):
        lines.append(f"  {name:6s} attribute accuracy {100 * figures['attribute_accuracy']:5.1f}% "
                     f"(chance {100 * report['chance']:.0f}%), caption loss own {figures['own_caption_loss']:.4f} "
                     f"vs other {figures['other_caption_loss']:.4f} ({100 * figures['gap']:+.1f}%)")
    return lines


def build_parser() -> argparse.ArgumentParser:
    from mgpt4_dist.cli import ArgumentParser

    parser = ArgumentParser(prog=PROG,
                            description="Held-out captions, attribute accuracy and own-vs-other caption loss of a "
                                        "tiny stage-1 run, with its projection at the initial state and as trained.")
    parser.add_argument("run", help="run, step or consolidated folder of a tiny stage-1 run")
    parser.add_argument("--shards", required=True, help="held-out synthetic shards (mgpt4-make-shards --synthetic)")
    parser.add_argument("--max-samples", type=int, default=64)
    parser.add_argument("--show", type=int, default=4, help="captions to print")
    parser.add_argument("--out", help="write the figures as JSON here")
    return parser


PROG = "python -m mgpt4_dist.tiny.probe"


def main(argv: Optional[List[str]] = None) -> int:
    from mgpt4_dist.cli import user_errors

    @user_errors(PROG)
    def run(argv: Optional[List[str]]) -> int:
        args = build_parser().parse_args(argv)
        if args.max_samples < 2 or args.show < 0:
            raise InvalidInputError("--max-samples must be >= 2 (own and other captions) and --show >= 0")
        if args.out and not os.access(os.path.dirname(os.path.abspath(args.out)), os.W_OK):
            raise InvalidInputError(f"--out {args.out}: its folder does not exist or cannot be written")
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
        report = probe_run(args.run, args.shards, args.max_samples)
        print(f"[probe] {report['samples']} held-out scenes ({args.shards}), projection at init vs trained:")
        print("\n".join(format_report(report, args.show)))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
            print(f"[probe] figures written to {args.out}")
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
