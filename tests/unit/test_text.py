"""BLIP caption cleaning, checked against outputs worked out by hand from the original rules."""
import pytest

from mgpt4_dist.data.text import blip_caption


@pytest.mark.parametrize("raw, expected", [
    ("A Dog.", "a dog"),
    ('"Quoted" (words) *star* #tag: a; b~c!', "quoted words star tag a b c"),
    ("Hello, world - it's here?", "hello, world - it's here?"),  # , - ' ? are not in the list
    ("a   lot\t\tof    space", "a lot of space"),
    ("one\ttab", "one\ttab"),  # a single tab is no run: the original keeps it
    ("trailing newline\n", "trailing newline"),
    ("  padded  ", "padded"),
    ("...", ""),
    ("Dots.In.Words", "dots in words"),
])
def test_cleaning_examples(raw, expected):
    assert blip_caption(raw) == expected


def test_long_captions_are_cut_to_max_words():
    words = [f"w{i}" for i in range(60)]
    assert blip_caption(" ".join(words)) == " ".join(words[:50])
    assert blip_caption(" ".join(words), max_words=3) == "w0 w1 w2"
    assert blip_caption("exactly three words", max_words=3) == "exactly three words"


def test_words_are_counted_after_punctuation_removal():
    # "a. b. c. d." -> "a b c d": four words once the dots are gone, so a cut at 3 keeps "a b c".
    assert blip_caption("A. B. C. D.", max_words=3) == "a b c"


def test_words_are_split_on_spaces_only():
    # As in the original, a tab does not separate words for the cut.
    assert blip_caption("a\tb c d", max_words=2) == "a\tb c"
