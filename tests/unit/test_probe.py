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


def test_pooled_gap_weights_each_set_by_its_tokens():
    from mgpt4_dist.tiny.probe import pooled_gap

    def report(own, other, tokens):
        return {"before": {"own_caption_loss": own, "other_caption_loss": other, "own_tokens": tokens,
                           "other_tokens": tokens}}

    # own (1.0*100 + 2.0*300)/400 = 1.75, other (1.5*100 + 2.0*300)/400 = 1.875: gap 0.125/1.875
    assert pooled_gap([report(1.0, 1.5, 100), report(2.0, 2.0, 300)], "before") == pytest.approx(0.125 / 1.875)


def test_probe_cli_refuses_bad_input_with_one_line(tmp_path):
    """`python -m mgpt4_dist.tiny.probe` as the quickstart runs it: bad options fail before any model loads."""
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mgpt4_dist.tiny.probe", *args], capture_output=True, text=True,
                              timeout=120)

    for args, said in ((["RUN", "--shards", "x", "--max-samples", "1"], "--max-samples must be >= 2"),
                       (["RUN", "--shards", "x", "--out", str(tmp_path / "no" / "p.json")], "cannot be written"),
                       ([str(tmp_path / "missing"), "--shards", "x"], "no such checkpoint folder")):
        proc = run(*args)
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
