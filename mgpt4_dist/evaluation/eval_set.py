"""The fixed held-out set: the first `max_samples` usable samples of the eval shards, in shard order.

Every rank reads the same list (so the set, and each sample's index, never depend on the world
size), and keeps the decoded inputs of its own share only: sample i belongs to rank i mod world.
References are the sample's `captions` list in KEY.json when it has one (as `mgpt4-make-shards`
writes them), else its one caption; the loss scores the caption training would use.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from mgpt4_dist.data import BadSampleError
from mgpt4_dist.data.samples import decode_feature_sample, decode_sample, sample_references
from mgpt4_dist.data.shards import expand_shard_pattern, read_shard_samples
from mgpt4_dist.data.transforms import build_resize_transform, normalize_images
from mgpt4_dist.errors import InvalidInputError, MissingFileError

log = logging.getLogger(__name__)


class EvalSetError(InvalidInputError):
    """Eval shards that give no usable sample, or no reference caption."""


@dataclass
class EvalSample:
    index: int
    key: str
    caption: str  # the answer the loss scores (cleaned as data.clean_captions says)
    references: List[str]  # reference captions for the metrics, as written in the shard
    inputs: Optional[torch.Tensor] = None  # uint8 image [3,H,W] or features [Q,W]; only on the owning rank


@dataclass
class EvalSet:
    samples: List[EvalSample]
    features: bool
    skipped: int = 0
    shards: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def share(self, rank: int, world: int, count: Optional[int] = None) -> List[EvalSample]:
        """This rank's samples among the first `count` (default all): indices rank, rank+world, ..."""
        return self.samples[:len(self.samples) if count is None else count][rank::world]

    def model_inputs(self, samples: Sequence[EvalSample]) -> torch.Tensor:
        """A batch as the model takes it: CLIP-normalized images, or the stored features."""
        stacked = torch.stack([s.inputs for s in samples])
        return stacked if self.features else normalize_images(stacked)


def resolve_eval_shards(patterns: Sequence[str], what: str = "eval.shards") -> List[str]:
    shards: List[str] = []
    for pattern in patterns:
        try:
            shards.extend(expand_shard_pattern(pattern))
        except FileNotFoundError as e:
            raise MissingFileError(f"{what}: {e}; check the path, or write shards with mgpt4-make-shards") from None
    if not shards:
        raise MissingFileError(f"{what} is empty: give at least one shard pattern")
    return sorted(dict.fromkeys(shards))


def read_eval_set(patterns: Sequence[str], max_samples: int, *, image_size: int, clean_captions: bool,
                  max_caption_words: int, features: bool, rank: int = 0, world: int = 1,
                  keep: Sequence[int] = (), what: str = "eval.shards") -> EvalSet:
    """The first `max_samples` usable samples; inputs decoded for this rank's share and for `keep`
    (indices every rank needs, e.g. a stand-in for padding calls)."""
    shards = resolve_eval_shards(patterns, what)
    transform = None if features else build_resize_transform(image_size)
    samples: List[EvalSample] = []
    skipped, reasons = 0, []
    for shard in shards:
        try:
            for raw in read_shard_samples(shard):
                if len(samples) >= max_samples:
                    break
                index = len(samples)
                try:
                    if features:
                        inputs, caption = decode_feature_sample(raw, clean_captions, max_caption_words)
                    else:
                        inputs, caption = decode_sample(raw, transform, clean_captions, max_caption_words)
                    references = sample_references(raw)
                except BadSampleError as e:
                    skipped += 1
                    reasons.append(str(e))
                    continue
                # Every rank decodes every sample (which samples are usable must not depend on the
                # rank), but keeps the inputs of its own share only.
                mine = index % world == rank or index in keep
                samples.append(EvalSample(index, raw.get("__key__", str(index)), caption, references,
                                          inputs if mine else None))
        except (BadSampleError, OSError) as e:
            skipped += 1
            reasons.append(f"rest of shard {shard}: {e}")
        if len(samples) >= max_samples:
            break
    if not samples:
        no_caption = [r for r in reasons if "caption" in r]
        if no_caption and len(no_caption) == len(reasons):
            raise EvalSetError(f"{what}: no sample has a reference caption (json 'caption'/'captions' or txt) in "
                               f"{len(shards)} shard(s), e.g. {no_caption[0]}")
        raise EvalSetError(f"{what}: no usable sample in {len(shards)} shard(s) ({', '.join(shards[:3])}"
                           f"{', ...' if len(shards) > 3 else ''})" + (f"; e.g. {reasons[0]}" if reasons else
                                                                       ": the shards are empty"))
    if skipped:
        log.warning("%s: skipped %d bad sample(s), e.g. %s", what, skipped, reasons[0])
    return EvalSet(samples, features, skipped, shards)
