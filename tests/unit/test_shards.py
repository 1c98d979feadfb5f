"""Shards end to end on real files: writing, finding, reading (also damaged tars), synthetic samples."""
import csv
import io
import json
import logging
import os
import re
import tarfile

import pytest
import torch
from PIL import Image

from mgpt4_dist.data import BadSampleError
from mgpt4_dist.data.samples import decode_sample
from mgpt4_dist.data.shards import expand_shard_pattern, read_shard_samples, write_shards
from mgpt4_dist.data.transforms import build_image_transform
from mgpt4_dist.tiny.scenes import SYNTHETIC_COLOURS, SYNTHETIC_SHAPES, synthetic_samples

TRANSFORM = build_image_transform(16)


# ------------------------------------------------------------------------------------ helpers

def _image_bytes(colour, fmt="JPEG", size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar(path, members) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            _add(tar, name, data)
    return str(path)


def _nearest_colour(rgb) -> str:
    return min(SYNTHETIC_COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, SYNTHETIC_COLOURS[name])))


def _raw(key="k", **fields):
    return {"__key__": key, "__url__": "test.tar", **fields}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    samples = list(synthetic_samples(20, seed=5, image_size=32))
    paths = write_shards(iter(samples), str(out), samples_per_shard=8, progress=False)
    return samples, paths


# ------------------------------------------------------------------------------------ writing and reading

def test_round_trip_keeps_keys_captions_and_images(written):
    samples, paths = written
    assert [os.path.basename(p) for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    raws = [raw for path in paths for raw in read_shard_samples(path)]
    assert [len(list(read_shard_samples(p))) for p in paths] == [8, 8, 4]
    assert [r["__key__"] for r in raws] == [key for key, _, _ in samples] == [f"{i:08d}" for i in range(20)]
    for raw, (key, jpeg, caption) in zip(raws, samples):
        assert raw["jpg"] == jpeg
        assert raw["txt"].decode("utf-8") == caption
        assert json.loads(raw["json"]) == {"caption": caption, "key": key}
        image, text = decode_sample(raw, TRANSFORM, clean=False, max_words=50)
        assert text == caption
        assert image.shape == (3, 16, 16) and torch.isfinite(image).all() and image.std() > 0
        assert decode_sample(raw, TRANSFORM, clean=True, max_words=3)[1] == " ".join(
            re.sub(r"[.!;]", " ", caption.lower()).split()[:3])


def test_shards_are_complete_tars_that_webdataset_reads(written):
    from webdataset.tariterators import tarfile_samples

    samples, paths = written
    for path in paths:
        with tarfile.open(path) as tar:
            assert all(m.isreg() for m in tar.getmembers())
    got = list(tarfile_samples([{"url": p} for p in paths]))
    assert [s["__key__"] for s in got] == [key for key, _, _ in samples]
    assert all({"jpg", "json", "txt"} <= set(s) for s in got)
    assert not [n for n in os.listdir(os.path.dirname(paths[0])) if not n.endswith(".tar")]  # no temp files


def test_equal_input_gives_identical_shards(tmp_path):
    a = write_shards(synthetic_samples(5, seed=1), str(tmp_path / "a"), progress=False)
    b = write_shards(synthetic_samples(5, seed=1), str(tmp_path / "b"), progress=False)
    assert open(a[0], "rb").read() == open(b[0], "rb").read()


def test_extra_json_fields_are_merged_but_cannot_replace_the_caption(tmp_path):
    samples = [("a", _image_bytes("red"), "A red one.")]
    [path] = write_shards(samples, str(tmp_path), extra_json=lambda key, cap: {"source": key * 2, "caption": "x"},
                          progress=False)
    [raw] = read_shard_samples(path)
    assert json.loads(raw["json"]) == {"source": "aa", "caption": "A red one.", "key": "a"}


def test_a_failure_midway_leaves_only_complete_shards(tmp_path):
    def samples():
        yield from synthetic_samples(5, image_size=16)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(samples(), str(tmp_path), samples_per_shard=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar", "shard-000001.tar"]  # the third was half-written
    assert [len(list(read_shard_samples(str(tmp_path / n)))) for n in sorted(os.listdir(tmp_path))] == [2, 2]


def test_a_shard_in_progress_is_invisible_under_its_final_name(tmp_path):
    # What a crash (no cleanup at all) would leave behind: only complete shards match *.tar.
    visible = []

    def samples():
        for i, sample in enumerate(synthetic_samples(5, image_size=16)):
            if i == 3:  # samples 0-1 are shard 0; sample 2 is in shard 1, not yet complete
                visible.append(sorted(n for n in os.listdir(tmp_path) if n.endswith(".tar")))
            yield sample

    write_shards(samples(), str(tmp_path), samples_per_shard=2, progress=False)
    assert visible == [["shard-000000.tar"]]
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


@pytest.mark.parametrize("key", ["a.b", "dir/a", ""])
def test_keys_that_would_break_grouping_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="key"):
        write_shards([(key, _image_bytes("red"), "c")], str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []


def test_nothing_to_write_writes_nothing(tmp_path):
    assert write_shards([], str(tmp_path / "out"), progress=False) == []
    assert os.listdir(tmp_path / "out") == []


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    write_shards(synthetic_samples(3, image_size=16), str(tmp_path), progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "3sample" in captured.err.replace(" ", "")


# ------------------------------------------------------------------------------------ damaged shards

def test_shard_cut_in_the_middle_yields_its_first_samples_then_fails(written, tmp_path):
    samples, paths = written
    data = open(paths[0], "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    keys = []
    with pytest.raises(BadSampleError, match=r"cut\.tar: truncated or corrupt tar after \d+ samples"):
        for raw in read_shard_samples(str(cut)):
            keys.append(raw["__key__"])
    assert 1 <= len(keys) < 8
    assert keys == [key for key, _, _ in samples[: len(keys)]]


def test_shard_cut_exactly_between_members_is_detected(written, tmp_path):
    # tarfile (and so webdataset) ends such a tar silently, as if it were complete.
    samples, paths = written
    with tarfile.open(paths[0]) as tar:
        offset = next(m.offset for m in tar.getmembers() if m.name == "00000004.json")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(paths[0], "rb").read()[:offset])
    got = []
    with pytest.raises(BadSampleError, match="after 5 samples"):
        for raw in read_shard_samples(str(cut)):
            got.append(raw)
    assert [r["__key__"] for r in got] == [f"{i:08d}" for i in range(5)]
    assert "json" not in got[-1] and "txt" not in got[-1]  # the cut-off sample shows what it lacks
    with pytest.raises(BadSampleError, match="missing or empty caption"):
        decode_sample(got[-1], TRANSFORM, clean=True, max_words=50)


@pytest.mark.parametrize("content", [b"", b"not a tar file at all" * 50])
def test_empty_or_garbage_file_is_a_bad_shard(tmp_path, content):
    path = tmp_path / "bad.tar"
    path.write_bytes(content)
    with pytest.raises(BadSampleError, match="after 0 samples"):
        list(read_shard_samples(str(path)))


def test_missing_shard_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_shard_samples(str(tmp_path / "gone.tar")))


# ------------------------------------------------------------------------------------ finding shards

@pytest.fixture
def shard_dir(tmp_path):
    for i in range(3):
        (tmp_path / f"shard-{i:03d}.tar").write_bytes(b"x")
    (tmp_path / "other-000.tar").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    (tmp_path / "dir-000.tar").mkdir()
    return tmp_path


def test_brace_ranges_expand_to_existing_files(shard_dir):
    expected = [str(shard_dir / f"shard-{i:03d}.tar") for i in range(3)]
    assert expand_shard_pattern(str(shard_dir / "shard-{000..002}.tar")) == expected
    assert expand_shard_pattern(str(shard_dir / "{shard-002,other-000,shard-000}.tar")) == sorted(
        [expected[2], str(shard_dir / "other-000.tar"), expected[0]])


def test_a_hole_in_a_range_is_warned_about(shard_dir, caplog):
    with caplog.at_level(logging.WARNING):
        found = expand_shard_pattern(str(shard_dir / "shard-{000..004}.tar"))
    assert len(found) == 3 and "2 listed file(s) do not exist" in caplog.text


def test_globs_match_files_only_and_combine_with_braces(shard_dir):
    assert expand_shard_pattern(str(shard_dir / "*.tar")) == sorted(
        str(shard_dir / n) for n in ["shard-000.tar", "shard-001.tar", "shard-002.tar", "other-000.tar"])
    assert expand_shard_pattern(str(shard_dir / "shard-00[01].tar")) == [
        str(shard_dir / "shard-000.tar"), str(shard_dir / "shard-001.tar")]
    assert expand_shard_pattern(str(shard_dir / "{shard,other}-00?.tar")) == expand_shard_pattern(
        str(shard_dir / "*.tar"))


@pytest.mark.parametrize("pattern", ["nothing-*.tar", "nothing-{000..003}.tar", "dir-000.tar"])
def test_pattern_matching_nothing_names_the_pattern(shard_dir, pattern):
    with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
        expand_shard_pattern(str(shard_dir / pattern))


def test_remote_patterns_are_only_brace_expanded():
    assert expand_shard_pattern("pipe:curl -s http://h/s-{0..1}.tar") == [
        "pipe:curl -s http://h/s-0.tar", "pipe:curl -s http://h/s-1.tar"]
    assert expand_shard_pattern("s3://bucket/x-{a,b}.tar") == ["s3://bucket/x-a.tar", "s3://bucket/x-b.tar"]


# ------------------------------------------------------------------------------------ synthetic samples

def test_synthetic_captions_name_the_colours_and_shape_they_show():
    for key, jpeg, caption in synthetic_samples(40, seed=3, image_size=32):
        image = Image.open(io.BytesIO(jpeg))
        assert image.format == "JPEG" and image.size == (32, 32)
        words = re.findall(r"[a-z]+", caption.lower())
        colours = [w for w in words if w in SYNTHETIC_COLOURS]
        shapes = [w for w in words if w in SYNTHETIC_SHAPES]
        assert len(colours) == 2 and len(shapes) == 1, caption
        fg, bg = colours  # every template names the shape's colour first
        rgb = image.convert("RGB").tobytes()
        pixels = [_nearest_colour(rgb[i:i + 3]) for i in range(0, len(rgb), 3)]
        assert _nearest_colour(image.getpixel((0, 0))) == bg, caption
        assert _nearest_colour(image.getpixel((31, 31))) == bg, caption
        assert pixels.count(fg) >= 0.02 * len(pixels), caption


def test_synthetic_samples_are_seeded_varied_and_keyed():
    first = list(synthetic_samples(200, seed=0, image_size=16))
    assert first == list(synthetic_samples(200, seed=0, image_size=16))
    assert first[:10] == list(synthetic_samples(10, seed=0, image_size=16))  # a prefix does not depend on n
    assert [s[2] for s in first[:10]] != [s[2] for s in synthetic_samples(10, seed=1, image_size=16)]
    assert [s[0] for s in first] == [f"{i:08d}" for i in range(200)]
    captions = [c for _, _, c in first]
    assert {w for c in captions for w in re.findall(r"[a-z]+", c.lower())} >= set(SYNTHETIC_COLOURS) | set(
        SYNTHETIC_SHAPES)
    skeletons = {re.sub(r"\b(a|an|small|large|" + "|".join([*SYNTHETIC_COLOURS, *SYNTHETIC_SHAPES]) + r")\b",
                        "_", c.lower()) for c in captions}
    assert len(skeletons) >= 6
    assert not re.search(r"\ba (?=[aeiou])", " ".join(captions).lower())  # "an orange", never "a orange"
