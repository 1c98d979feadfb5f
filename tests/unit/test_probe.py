"""The tiny learning probe's scoring: attribute accuracy against hand-counted values, and chance."""
import pytest

from mgpt4_dist.tiny.probe import CHANCE_ACCURACY, attribute_accuracy


def test_attribute_accuracy_counts_each_named_attribute():
    references = ["A red square on a blue background.", "There is a small green circle in front of a black background."]
    captions = [
        "a photo of a large red square over a blue background",  # 3 of 3
        "a green triangle on a white background",  # fg right; shape and bg wrong: 1 of 3
    ]
    assert attribute_accuracy(captions, references) == pytest.approx(4 / 6)
    # A caption naming nothing scores nothing; the background is the second colour named.
    assert attribute_accuracy(["", "a black circle on a green background"], references) == pytest.approx(1 / 6)


def test_chance_is_uniform_guessing_of_the_scene_attributes():
    assert CHANCE_ACCURACY == pytest.approx((1 / 8 + 1 / 4 + 1 / 7) / 3)
