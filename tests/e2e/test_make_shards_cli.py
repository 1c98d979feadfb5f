"""`mgpt4-make-shards` as a user runs it: a subprocess, its one-line summary, its exit codes."""
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mgpt4_dist.cli.make_shards import InputError, make_shards
from mgpt4_dist.data.samples import decode_sample, sample_references
from mgpt4_dist.data.shards import read_shard_samples


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mgpt4_dist.cli.make_shards", *args],
                          capture_output=True, text=True, timeout=120)


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_synthetic_shards_and_summary_line(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("--synthetic", "20", "--samples-per-shard", "8", "--seed", "3", "--image-size", "16",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"wrote 3 shards (20 samples, 0 skipped) to {out} (shard-000000.tar .. shard-000002.tar)"]
    assert sorted(os.listdir(out)) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [len(list(read_shard_samples(str(out / n)))) for n in sorted(os.listdir(out))] == [8, 8, 4]
    assert "20/20" in proc.stderr and "shards=3" in proc.stderr  # the progress bar, on stderr

    again = run_cli("--synthetic", "4", "--out", str(out))  # would mix old and new shards
    assert again.returncode == 2 and "already holds 3 shard-*.tar" in again.stderr


def test_missing_captions_file_is_exit_2_naming_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    missing = tmp_path / "captions-that-do-not-exist.jsonl"
    proc = run_cli("--images", str(tmp_path / "images"), "--captions", str(missing), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "o").exists()


def test_help_lists_the_sources():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for option in ("--images", "--captions", "--cc-sbu-align", "--synthetic", "--out", "--samples-per-shard"):
        assert option in proc.stdout


def test_folder_source_counts_skipped_samples(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(_jpeg("red"))
    (images / "b.jpg").write_bytes(_jpeg("blue"))
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(r) for r in [
        {"image": "a.jpg", "caption": "red"}, {"image": "b.jpg", "captions": ["Blue.", "A blue square.", "blue"]},
        {"image": "gone.jpg", "caption": "missing"}]))
    report = make_shards(str(tmp_path / "out"), images=str(images), captions=str(captions), progress=False)
    assert (report.samples, report.skipped, len(report.shards)) == (2, 1, 1)
    assert report.summary() == (f"wrote 1 shard (2 samples, 1 skipped) to {tmp_path / 'out'} (shard-000000.tar)")
    assert "gone.jpg" in capsys.readouterr().err
    # Several reference captions: KEY.json holds them all, "caption" (what training reads) the first.
    raws = {raw["__key__"]: raw for raw in read_shard_samples(report.shards[0])}
    assert json.loads(raws["b"]["json"]) == {"captions": ["Blue.", "A blue square.", "blue"], "caption": "Blue.",
                                             "key": "b"}
    assert raws["b"]["txt"] == b"Blue." and "captions" not in json.loads(raws["a"]["json"])
    assert [sample_references(raws[k]) for k in ("a", "b")] == [["red"], ["Blue.", "A blue square.", "blue"]]
    assert decode_sample(raws["b"], lambda image: image.size, clean=True, max_words=50) == ((8, 8), "blue")


def test_cc_sbu_align_source_with_prefix(tmp_path):
    root = tmp_path / "cc_sbu_align"
    (root / "image").mkdir(parents=True)
    for i in range(5):
        (root / "image" / f"{i}.jpg").write_bytes(_jpeg((i * 40, 0, 0)))
    (root / "filter_cap.json").write_text(json.dumps(
        {"annotations": [{"image_id": str(i), "caption": f"Caption {i}."} for i in range(5)]}))
    report = make_shards(str(tmp_path / "out"), cc_sbu_align=str(root), prefix="cc", samples_per_shard=2,
                         progress=False)
    assert [os.path.basename(p) for p in report.shards] == ["cc-000000.tar", "cc-000001.tar", "cc-000002.tar"]
    assert [raw["__key__"] for p in report.shards for raw in read_shard_samples(p)] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("kwargs, message", [
    ({"synthetic": 0}, "--synthetic must be >= 1"),
    ({"synthetic": 2, "samples_per_shard": 0}, "--samples-per-shard must be >= 1"),
    ({"synthetic": 2, "cc_sbu_align": "x"}, "exactly one of"),
    ({}, "exactly one of"),
    ({"cc_sbu_align": "/no/such/folder"}, "/no/such/folder"),
    ({"images": "/tmp"}, "--images and --captions go together"),
])
def test_bad_input_raises_input_error(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        make_shards(str(tmp_path / "out"), progress=False, **kwargs)


def test_no_usable_sample_is_an_error(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"not a jpeg")
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\na.jpg,broken\n")
    with pytest.raises(InputError, match=r"no usable samples in .*captions.csv \(1 skipped\)"):
        make_shards(str(tmp_path / "out"), images=str(images), captions=str(captions), progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_out_that_is_a_file_is_an_error(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        make_shards(str(a_file), synthetic=2, progress=False)
