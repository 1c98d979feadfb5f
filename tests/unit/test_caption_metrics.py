"""BLEU-4 and CIDEr-D against values computed by hand, and the references a sample carries."""
import math

import pytest

from mgpt4_dist.evaluation.caption_metrics import caption_scores, tokenize_caption


def test_tokenized_as_blips_caption_cleaner():
    assert tokenize_caption("  A Red square.  On (blue)!") == "a red square on blue"


def test_bleu4_by_hand():
    # 5 words, 4 of 5 unigrams, 3 of 4 bigrams, 2 of 3 trigrams, 1 of 2 4-grams match; same length.
    assert math.isclose(caption_scores(["a b c d e"], [["a b c d f"]])["bleu4"],
                        (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel_tol=1e-6)
    # All n-grams match, but half the reference length: brevity penalty exp(1 - 8/4).
    assert math.isclose(caption_scores(["a b c d"], [["a b c d e f g h"]])["bleu4"], math.exp(-1), rel_tol=1e-6)
    # The closest of several references sets the length.
    assert math.isclose(caption_scores(["a b c d"], [["a b c d e f g h", "a b c d"]])["bleu4"], 1.0, rel_tol=1e-6)


def test_cider_d_by_hand():
    """Two images, one reference each; idf = log(2) for an n-gram of one image's references.
    Image 1, 'red circle' vs 'red square': unigram cosine (log2)^2 / (sqrt2 log2)^2 = 1/2, bigrams 0,
    no 3/4-grams: 10 x mean(1/2, 0, 0, 0) = 1.25. Image 2, 'blue triangle' exactly: 10 x mean(1, 1, 0, 0)
    = 5. CIDEr-D is their mean, 3.125; cleaning makes case and punctuation irrelevant."""
    scores = caption_scores(["Red circle.", "blue triangle"], [["red square"], ["Blue triangle!"]])
    assert math.isclose(scores["cider"], 3.125, rel_tol=1e-9)
    assert caption_scores(["green", "yellow"], [["red square"], ["blue triangle"]])["cider"] == 0.0


def test_mismatched_lists_are_refused():
    with pytest.raises(ValueError):
        caption_scores(["a"], [])
