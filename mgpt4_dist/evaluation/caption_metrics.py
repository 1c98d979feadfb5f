"""Caption metrics: BLEU-4 and CIDEr-D, the COCO caption standard, with pycocoevalcap's scorers.

Captions and references are tokenized by BLIP's caption cleaner (`mgpt4_dist.data.text.blip_caption`:
lowercase, `.!"()*#:;~` to spaces, whitespace collapsed) and split on spaces, instead of the Java PTB
tokenizer of the COCO toolkit: pure Python, and the same text rules the stage-1 captions trained on.
pycocoevalcap is the `[eval]` extra; `require_caption_metrics` refuses a run that asks for metrics
without it, before anything starts.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from mgpt4_dist.data.text import blip_caption
from mgpt4_dist.errors import MissingExtraError

# No word limit for scoring: the cleaner's 50-word cut is a training rule.
_NO_WORD_LIMIT = 10 ** 9


def require_caption_metrics(what: str) -> None:
    """Raise MissingExtraError naming the install command unless pycocoevalcap imports."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu  # noqa: F401
        from pycocoevalcap.cider.cider import Cider  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            f"{what} needs pycocoevalcap for BLEU-4 and CIDEr-D: pip install 'mgpt4_dist[eval]' (or pip install "
            f"pycocoevalcap)", extra="eval") from None


def tokenize_caption(caption: str) -> str:
    """A caption as the scorers see it: BLIP-cleaned words joined by single spaces."""
    return " ".join(w for w in blip_caption(caption, _NO_WORD_LIMIT).split() if w)


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> Dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of one candidate per image against its references (one or more).

    {"bleu4": float, "cider": float}; CIDEr-D's document frequencies come from these references, as
    in the COCO evaluation. An empty candidate scores 0 (it is scored as an empty string)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    results: Dict[int, List[str]] = {}
    gts: Dict[int, List[str]] = {}
    for i, (cand, refs) in enumerate(zip(candidates, references)):
        if not refs:
            raise ValueError(f"caption {i} has no reference")
        results[i] = [tokenize_caption(cand)]
        gts[i] = [tokenize_caption(r) for r in refs]
    bleu, _ = Bleu(4).compute_score(gts, results, verbose=0)
    cider, _ = Cider().compute_score(gts, results)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}
