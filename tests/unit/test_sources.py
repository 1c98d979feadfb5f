"""Sources on real files: image folders with caption files (jsonl/csv/json), cc_sbu_align."""
import csv
import io
import json

import pytest
from PIL import Image

from mgpt4_dist.data.sources import CaptionsFileError, iter_cc_sbu_align, iter_folder_captions


def _image_bytes(colour, fmt="JPEG", size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ sources

@pytest.fixture
def image_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(_image_bytes("red"))
    (images / "b.png").write_bytes(_image_bytes("blue", "PNG"))
    (images / "c.jpg").write_bytes(_image_bytes("green")[:30])  # truncated
    (images / "1234.jpg").write_bytes(_image_bytes("white"))
    (images / "photo.v2.jpg").write_bytes(_image_bytes("black"))
    return images


def _check_folder_samples(samples, skipped):
    by_key = {key: (jpeg, caption) for key, jpeg, caption in samples}
    assert list(by_key) == ["a", "b", "1234", "photo_v2", "a_1"]
    assert by_key["a"][1] == "A red image." and by_key["a_1"][1] == "A second caption for a."
    assert all(jpeg.startswith(b"\xff\xd8\xff") for jpeg, _ in by_key.values())  # the PNG was re-encoded
    assert by_key["a"][0] == _image_bytes("red")  # JPEGs are kept byte for byte
    blue = Image.open(io.BytesIO(by_key["b"][0])).convert("RGB").getpixel((5, 5))
    assert blue[2] > 150 and blue[0] < 100 and blue[1] < 100
    assert any("c.jpg" in reason for reason in skipped)
    assert any("'missing.jpg' not found" in reason for reason in skipped)


def test_folder_with_jsonl_captions(image_dir, tmp_path, capsys):
    rows = [{"image": "a.jpg", "caption": "A red image."}, {"file_name": "b.png", "text": "Blue."},
            {"file": "c.jpg", "caption": "broken"}, {"image": "missing.jpg", "caption": "gone"},
            {"image_id": 1234, "caption": "an id without extension"}, {"image": "photo.v2.jpg", "caption": "dots"},
            {"image": "a.jpg", "caption": "A second caption for a."}, {"image": "a.jpg"}, ["not", "an", "object"]]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n\n")
    skipped = []
    samples = list(iter_folder_captions(str(image_dir), str(captions), skipped))
    _check_folder_samples(samples, skipped)
    assert len(skipped) == 5  # c.jpg, missing.jpg, no caption, a list, broken JSON
    assert capsys.readouterr().err.count("warning: skipping") == 5


def test_folder_with_csv_captions(image_dir, tmp_path):
    captions = tmp_path / "captions.csv"
    with open(captions, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption", "source"])
        for name, caption in [("a.jpg", "A red image."), ("b.png", "Blue, with a comma"), ("c.jpg", "broken"),
                              ("missing.jpg", "gone"), ("1234", "by stem"), ("photo.v2.jpg", "dots"),
                              ("a.jpg", "A second caption for a."), ("a.jpg", "")]:
            writer.writerow([name, caption, "test"])
    skipped = []
    samples = list(iter_folder_captions(str(image_dir), str(captions), skipped))
    _check_folder_samples(samples, skipped)
    assert len(skipped) == 3


def test_captions_file_problems_are_reported_before_any_sample(image_dir, tmp_path):
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("path,label\na.jpg,red\n")
    with pytest.raises(CaptionsFileError, match="CSV header needs an image column"):
        iter_folder_captions(str(image_dir), str(bad_header))
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("image\tcaption\na.jpg\tred\n")
    with pytest.raises(CaptionsFileError, match="unknown captions format"):
        iter_folder_captions(str(image_dir), str(tsv))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        iter_folder_captions(str(image_dir), str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="no-dir"):
        iter_folder_captions(str(tmp_path / "no-dir"), str(bad_header))


def test_cc_sbu_align_layout(tmp_path):
    root = tmp_path / "cc_sbu_align"
    (root / "image").mkdir(parents=True)
    (root / "image" / "2.jpg").write_bytes(_image_bytes("red"))
    (root / "image" / "3.jpg").write_bytes(_image_bytes("blue"))
    annotations = [{"image_id": "2", "caption": "The image shows a red wall. It is plain."},
                   {"image_id": "3", "caption": "A blue picture."},
                   {"image_id": "4", "caption": "Its image file is missing."}]
    (root / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    skipped = []
    samples = list(iter_cc_sbu_align(str(root), skipped))
    assert [(k, c) for k, _, c in samples] == [("2", annotations[0]["caption"]), ("3", "A blue picture.")]
    assert samples[0][1] == _image_bytes("red")
    assert len(skipped) == 1 and "'4' not found" in skipped[0]


def test_cc_sbu_align_problems_raise_before_any_sample(tmp_path):
    root = tmp_path / "cc"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match="filter_cap.json"):
        iter_cc_sbu_align(str(root))
    (root / "filter_cap.json").write_text(json.dumps([{"image_id": "2", "caption": "x"}]))
    (root / "image").mkdir()
    with pytest.raises(CaptionsFileError, match="annotations"):
        iter_cc_sbu_align(str(root))


def test_a_captions_list_gives_references_whose_first_is_the_caption(image_dir, tmp_path):
    rows = [{"image": "a.jpg", "captions": ["A red image.", "Red, nothing else."]},
            {"image": "b.png", "caption": "Blue.", "captions": ["A blue one."]},
            {"image": "1234.jpg", "caption": "One caption only."},
            {"image": "photo.v2.jpg", "captions": "not a list"}]
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps(rows))
    skipped = []
    samples = list(iter_folder_captions(str(image_dir), str(captions), skipped))
    assert [(s[0], s[2], s[3:]) for s in samples] == [
        ("a", "A red image.", ({"captions": ["A red image.", "Red, nothing else."]},)),
        ("b", "Blue.", ({"captions": ["Blue.", "A blue one."]},)),
        ("1234", "One caption only.", ())]
    assert len(skipped) == 1 and "'captions' must be a list" in skipped[0]
