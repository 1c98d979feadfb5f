"""Sample decoding on real tars: images, captions (json / txt / img2dataset), references, failures."""
import io
import json
import tarfile

import pytest
from PIL import Image

from mgpt4_dist.data import BadSampleError
from mgpt4_dist.data.samples import decode_sample, raw_caption, sample_references
from mgpt4_dist.data.shards import read_shard_samples
from mgpt4_dist.data.transforms import build_image_transform

TRANSFORM = build_image_transform(16)


def _image_bytes(colour, fmt="JPEG", size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _tar(path, members) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _raw(key="k", **fields):
    return {"__key__": key, "__url__": "test.tar", **fields}


# ------------------------------------------------------------------------------------ decoding samples

def test_img2dataset_style_shard_decodes(tmp_path):
    meta = {"url": "http://example.com/1.jpg", "key": "00000001", "status": "success", "error_message": None,
            "width": 12, "height": 10, "original_width": 640, "original_height": 480, "exif": "{}",
            "sha256": "0" * 64, "caption": "A Red Square!"}
    path = _tar(tmp_path / "00000.tar", [
        ("00000001.jpg", _image_bytes("red")), ("00000001.txt", b"A Red Square!"),
        ("00000001.json", json.dumps(meta).encode()),
        # No caption column at download time: json caption is null, the caption is in txt.
        ("00000002.jpg", _image_bytes("blue")), ("00000002.txt", b"Blue."),
        ("00000002.json", json.dumps({**meta, "key": "00000002", "caption": None}).encode()),
        ("00000003.png", _image_bytes("green", "PNG")), ("00000003.txt", b"green, png"),
    ])
    decoded = {raw["__key__"]: decode_sample(raw, TRANSFORM, clean=True, max_words=50)
               for raw in read_shard_samples(path)}
    assert {key: caption for key, (_, caption) in decoded.items()} == {
        "00000001": "a red square", "00000002": "blue", "00000003": "green, png"}
    red = decoded["00000001"][0]
    assert red[0].mean() > red[2].mean()  # the red image is red


@pytest.mark.parametrize("fields, problem", [
    ({"json": b'{"caption": "x"}'}, "no image"),
    ({"jpg": b"\xff\xd8\xff garbage", "json": b'{"caption": "x"}'}, "undecodable or truncated image"),
    ({"jpg": "TRUNCATED", "json": b'{"caption": "x"}'}, "truncated"),
    ({"jpg": "OK"}, "missing or empty caption"),
    ({"jpg": "OK", "json": b'{"url": "u"}'}, "missing or empty caption"),
    ({"jpg": "OK", "json": b'{"caption": "  "}', "txt": b""}, "missing or empty caption"),
    ({"jpg": "OK", "json": b'{"caption": '}, "bad JSON"),
    ({"jpg": "OK", "json": b'["caption"]'}, "bad JSON"),
    ({"jpg": "OK", "json": b'{"caption": 7}'}, "not a string"),
    ({"jpg": "OK", "txt": b"\xff\xfe"}, "not UTF-8"),
    ({"jpg": "OK", "txt": b"..."}, "empty after cleaning"),
])
def test_bad_samples_raise_bad_sample_error_naming_key_and_problem(fields, problem):
    good = _image_bytes("red")
    images = {"OK": good, "TRUNCATED": good[: len(good) // 2]}
    raw = _raw("sample42", **{k: images.get(v, v) for k, v in fields.items()})
    with pytest.raises(BadSampleError) as info:
        decode_sample(raw, TRANSFORM, clean=True, max_words=50)
    assert "'sample42'" in str(info.value) and problem in str(info.value)


def test_raw_caption_is_kept_when_not_cleaning():
    raw = _raw(jpg=_image_bytes("red"), json=json.dumps({"caption": "Keep THIS (as is)."}).encode())
    assert decode_sample(raw, TRANSFORM, clean=False, max_words=1)[1] == "Keep THIS (as is)."


def test_references_are_the_json_captions_list_else_the_caption():
    several = _raw(json=json.dumps({"caption": "A red one.", "captions": ["A red one.", "Red, plain."]}).encode())
    assert sample_references(several) == ["A red one.", "Red, plain."]
    assert raw_caption(several) == "A red one."  # training keeps using the caption
    assert sample_references(_raw(txt=b"Only txt.")) == ["Only txt."]
    with pytest.raises(BadSampleError, match="'k'.*captions must be a non-empty list"):
        sample_references(_raw(json=json.dumps({"caption": "x", "captions": [3]}).encode()))
