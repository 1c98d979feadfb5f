"""What a tiny stage-1 run learnt, on held-out synthetic scenes: `python -m mgpt4_dist.tiny.probe`.

For held-out shards (`mgpt4-make-shards --synthetic N --seed S` with a seed no run trains on) it
compares the model with its projection at init (the run's own seeded init) and after training:
- greedy captions (the inference generation path) and the share of them that name the scene's
  foreground colour, shape and background colour (chance: 1/8, 1/4, 1/7);
- the loss of each image's own caption against the loss of another scene's caption (its
  neighbour in the shard): a model that uses the image scores its own caption lower.
The quickstart prints it; the learning tests assert on `probe_run`'s result.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

ATTRIBUTES = ("fg", "shape", "bg")


@dataclass
class ProbeSide:
    """One model state (projection at init, or trained)."""

    own_loss: float  # mean token CE of each image's own caption
    other_loss: float  # ... of another scene's caption
    captions: List[str] = field(default_factory=list)
    attribute_accuracy: Dict[str, float] = field(default_factory=dict)  # per attribute and "mean"

    @property
    def gap(self) -> float:
        """(other - own) / other: > 0 when the image makes its own caption likelier."""
        return (self.other_loss - self.own_loss) / self.other_loss


@dataclass
class ProbeResult:
    references: List[str]
    init: ProbeSide
    trained: ProbeSide


def read_held_out(pattern: str, max_samples: int, image_size: int):
    """(images [N,3,H,W], cleaned captions) of the first `max_samples` samples of the shards."""
    import torch

    from mgpt4_dist.data.shards import decode_sample, expand_shard_pattern, read_shard_samples
    from mgpt4_dist.data.transforms import build_image_transform

    transform = build_image_transform(image_size)
    images, captions = [], []
    for path in expand_shard_pattern(pattern):
        for raw in read_shard_samples(path):
            image, caption = decode_sample(raw, transform, clean=True, max_words=50)
            images.append(image)
            captions.append(caption)
            if len(images) == max_samples:
                return torch.stack(images), captions
    if len(images) < 2:
        from mgpt4_dist.errors import InvalidInputError

        raise InvalidInputError(f"--shards {pattern}: {len(images)} samples; the probe needs at least 2")
    return torch.stack(images), captions


def attribute_accuracy(generated: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Share of generated captions naming each attribute of their reference, and the mean of the three."""
    from mgpt4_dist.tiny.scenes import caption_attributes

    hits = {a: 0 for a in ATTRIBUTES}
    for gen, ref in zip(generated, references):
        got, want = caption_attributes(gen), caption_attributes(ref)
        for a in ATTRIBUTES:
            hits[a] += got[a] is not None and got[a] == want[a]
    acc = {a: hits[a] / max(len(references), 1) for a in ATTRIBUTES}
    acc["mean"] = sum(acc.values()) / len(ATTRIBUTES)
    return acc


def _probe_side(model, tokenizer, cfg, images, captions: List[str], num_captions: int,
                max_new_tokens: int) -> ProbeSide:
    import torch
    from types import SimpleNamespace

    from mgpt4_dist.inference.generate import generate
    from mgpt4_dist.models.sequence import IMAGE_PLACEHOLDER, SequenceBuilder

    build_text = SequenceBuilder(tokenizer, model.num_image_tokens, cfg.data.max_txt_len, cfg.data.end_sym,
                                 cfg.model.max_context_len)
    others = captions[1:] + captions[:1]  # each image with its neighbour's caption
    with torch.no_grad():
        own = model.loss_terms(images, build_text(captions)).loss.item()
        other = model.loss_terms(images, build_text(others)).loss.item()
        bundle = SimpleNamespace(model=model, tokenizer=tokenizer)
        generated = []
        for k in range(min(num_captions, len(captions))):
            embeds = model.encode_image(images[k:k + 1])
            # Stage 1 has no instruction: the image alone is the condition (prompt_template "").
            text = generate(bundle, embeds, IMAGE_PLACEHOLDER, [cfg.data.end_sym], max_new_tokens=max_new_tokens,
                            temperature=0, repetition_penalty=1.0)
            generated.append(text.strip())
    return ProbeSide(own, other, generated, attribute_accuracy(generated, captions[:len(generated)]))


def probe_run(config: str, overrides: Sequence[str], run: str, shards: str, max_samples: int = 64,
              num_captions: int = 32, max_new_tokens: int = 24) -> ProbeResult:
    """The probe for the run (or step folder) `run` of `config` + `overrides` on held-out `shards`."""
    import torch

    from mgpt4_dist.config import load_config
    from mgpt4_dist.models.llm import load_tokenizer
    from mgpt4_dist.models.minigpt4 import build_minigpt4

    cfg = load_config(config, list(overrides))
    tokenizer = load_tokenizer(cfg.model.llm_path)
    images, captions = read_held_out(shards, max_samples, cfg.model.vit.img_size)
    sides = []
    for proj in ("", run):  # the run's own seeded init, then its trained projection
        cfg.model.proj_checkpoint = proj
        with torch.random.fork_rng(devices=[]):
            model = build_minigpt4(cfg.model, seed=cfg.train.seed).eval()
        sides.append(_probe_side(model, tokenizer, cfg, images, captions, num_captions, max_new_tokens))
    return ProbeResult(captions[:num_captions], *sides)


def format_report(result: ProbeResult, show: int) -> List[str]:
    lines = []
    for k in range(min(show, len(result.references))):
        lines += [f"held-out image {k}: reference: {result.references[k]}",
                  f"    before training: {result.init.captions[k]}",
                  f"    after training:  {result.trained.captions[k]}"]
    for name, side in (("before", result.init), ("after", result.trained)):
        acc = side.attribute_accuracy
        lines.append(f"{name} training: attribute accuracy {100 * acc['mean']:.0f}% (foreground colour "
                     f"{100 * acc['fg']:.0f}%, shape {100 * acc['shape']:.0f}%, background colour {100 * acc['bg']:.0f}%; "
                     f"chance 12/25/14%) over {len(side.captions)} captions; loss own caption {side.own_loss:.4f} vs "
                     f"another scene's {side.other_loss:.4f} ({100 * side.gap:+.1f}%)")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mgpt4_dist.tiny.probe",
        description="Captions and attribute accuracy of a tiny stage-1 run on held-out synthetic scenes, "
                    "before training (projection at init) and after.")
    parser.add_argument("--config", required=True, help="the run's config (e.g. mgpt4_dist/configs/tiny_stage1.yaml)")
    parser.add_argument("--run", required=True, help="the run folder (its latest checkpoint) or a step folder")
    parser.add_argument("--shards", required=True, help="held-out shards (mgpt4-make-shards --synthetic N --seed S)")
    parser.add_argument("--max-samples", type=int, default=64, help="held-out samples for the losses")
    parser.add_argument("--num-captions", type=int, default=32, help="held-out images to caption")
    parser.add_argument("--show", type=int, default=4, help="captions to print")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (the asset paths)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from mgpt4_dist.cli import user_errors

    @user_errors("mgpt4_dist.tiny.probe")
    def run(argv: Optional[List[str]]) -> int:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
        args = build_parser().parse_args(argv)
        result = probe_run(args.config, args.overrides, args.run, args.shards, args.max_samples, args.num_captions)
        if args.json:
            print(json.dumps({**asdict(result), "init_gap": result.init.gap, "trained_gap": result.trained.gap}))
        else:
            print("\n".join(format_report(result, args.show)))
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
