"""Caption text rules: the BLIP caption cleaning MiniGPT-4 applies to stage-1 captions.

Owns only string-level rules; tokenization belongs to the model side.
"""
from __future__ import annotations

import re

# The punctuation the original cleaner turns into spaces; commas, apostrophes and hyphens survive.
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
# Only runs of two or more whitespace characters are collapsed: a lone tab or newline survives,
# exactly as in the original, so cleaned captions match what the released checkpoints saw.
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def blip_caption(caption: str, max_words: int = 50) -> str:
    """Lowercase, `.!"()*#:;~` to spaces, whitespace runs to one space, trimmed, cut to max_words words."""
    text = _PUNCTUATION.sub(" ", caption.lower())
    text = _WHITESPACE_RUN.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text
