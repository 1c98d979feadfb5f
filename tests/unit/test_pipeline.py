"""The training stream: exact resume positions, distinct splits, weighted mixing, bad samples."""
import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image

from mgpt4_dist.config import DataConfig
from mgpt4_dist.data.pipeline import ShardStream, build_batch_loader, resolve_sources
from mgpt4_dist.data.shards import write_shards
from mgpt4_dist.tiny.scenes import synthetic_samples

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(synthetic_samples(60, seed=1, image_size=32), str(out), samples_per_shard=10, progress=False)
    return str(out)


def loader(sources, start=None, num_workers=0, rank=0, world_size=1, resample=True, batch_size=4, group=0):
    data = DataConfig(num_workers=num_workers, resample=resample, clean_captions=True, max_caption_words=50,
                      group_by_length=group)
    return build_batch_loader(data, sources, rank=rank, world_size=world_size, seed=7, batch_size=batch_size,
                              image_size=IMAGE_SIZE, start=start)


@pytest.mark.parametrize("num_workers,group", [(0, 0), (2, 0), (0, 3), (2, 3)])
def test_resume_continues_exactly(shard_dir, num_workers, group):
    sources = resolve_sources([(os.path.join(shard_dir, "*.tar"), 1.0)])
    straight = loader(sources, num_workers=num_workers, group=group)
    reference = [next(straight) for _ in range(9)]
    first = loader(sources, num_workers=num_workers, group=group)
    for _ in range(5):  # with group=3 and 2 workers, stream 0 stops inside its first window
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # must survive serialisation
    if group:
        assert any("window_done" in p for p in state["positions"].values())
    resumed = loader(sources, start=state, num_workers=num_workers, group=group)
    for expected in reference[5:]:
        got = next(resumed)
        assert got["keys"] == expected["keys"]
        assert torch.equal(got["images"], expected["images"])
    assert resumed.state_dict()["batches"] == 9


def test_ranks_read_different_samples(shard_dir):
    sources = resolve_sources([(os.path.join(shard_dir, "*.tar"), 1.0)])
    a = loader(sources, rank=0, world_size=2)
    b = loader(sources, rank=1, world_size=2)
    assert [next(a)["keys"] for _ in range(5)] != [next(b)["keys"] for _ in range(5)]


def test_one_pass_without_resampling_has_no_duplicates_or_gaps(shard_dir):
    sources = resolve_sources([(os.path.join(shard_dir, "*.tar"), 1.0)])
    world, workers = 2, 2
    seen = []
    for rank in range(world):
        stream = ShardStream(sources, rank=rank, world_size=world, num_workers=workers, seed=3, resample=False,
                             batch_size=4, image_size=IMAGE_SIZE, clean_captions=True, max_caption_words=50)
        for role in range(workers):
            for _, _, key, pos in stream.samples(rank * workers + role, {"epoch": 0, "index": 0, "offset": 0, "skipped": 0}):
                if pos["epoch"] > 0:  # first sample of the next pass
                    break
                seen.append(key)
    assert len(seen) == 60 and len(set(seen)) == 60


def test_images_are_the_clip_transform_of_the_stored_jpegs(shard_dir):
    from mgpt4_dist.data.shards import read_shard_samples
    from mgpt4_dist.data.transforms import build_image_transform, decode_image

    sources = resolve_sources([(os.path.join(shard_dir, "*.tar"), 1.0)])
    batch = next(loader(sources))
    raws = {raw["__key__"]: raw for shard in sources[0].shards for raw in read_shard_samples(shard)}
    transform = build_image_transform(IMAGE_SIZE)
    for key, image in zip(batch["keys"], batch["images"]):
        assert torch.equal(image, transform(decode_image(raws[key]["jpg"])))


def padding_of(batch):
    lengths = [len(a) for a in batch["answers"]]
    return sum(max(lengths) - n for n in lengths)


def test_length_grouping_reorders_a_window_and_cuts_padding(shard_dir):
    sources = resolve_sources([(os.path.join(shard_dir, "*.tar"), 1.0)])
    window = 5
    plain = [next(it) for it in [loader(sources, batch_size=4)] for _ in range(window)]
    grouped = [next(it) for it in [loader(sources, batch_size=4, group=window)] for _ in range(window)]
    # The same samples (a window is exactly `window` batches of the stream), fewer padded characters.
    assert sorted(k for b in grouped for k in b["keys"]) == sorted(k for b in plain for k in b["keys"])
    assert sum(map(padding_of, grouped)) < sum(map(padding_of, plain)) / 2
    for b in grouped:  # each batch is a run of the sorted window
        assert [len(a) for a in b["answers"]] == sorted(len(a) for a in b["answers"])
    # The position after the window's last batch is the window's end, as without grouping.
    assert "window_done" not in grouped[-1]["position"]


def test_grouped_batches_of_a_pass_have_no_duplicates_or_gaps(shard_dir):
    sources = resolve_sources([(os.path.join(shard_dir, "*.tar"), 1.0)])
    stream = ShardStream(sources, rank=0, world_size=1, num_workers=1, seed=3, resample=False, batch_size=4,
                         image_size=IMAGE_SIZE, clean_captions=True, max_caption_words=50, group_by_length=3)
    keys = [k for batch, _ in zip(iter(stream), range(15)) for k in batch["keys"]]  # 15 x 4 = 60: one pass
    assert len(keys) == 60 and len(set(keys)) == 60


def test_a_changed_grouping_window_continues_after_the_old_one(shard_dir):
    sources = resolve_sources([(os.path.join(shard_dir, "*.tar"), 1.0)])
    first = loader(sources, resample=False, group=5)
    consumed = [k for _ in range(2) for k in next(first)["keys"]]  # 2 of the window's 5 batches
    state = json.loads(json.dumps(first.state_dict()))
    window = {k for b in [first] for _ in range(3) for k in next(b)["keys"]} | set(consumed)
    for group in (2, 0):  # another window size, or grouping switched off
        resumed = loader(sources, resample=False, group=group, start=state)
        later = [k for _ in range(3) for k in next(resumed)["keys"]]
        assert not set(later) & window, group  # nothing of the interrupted window is read again


def test_rescaled_streams_start_past_an_interrupted_window():
    from mgpt4_dist.data.pipeline import rescale_data_state

    inside = {"epoch": 0, "index": 3, "offset": 0, "skipped": 1, "window_done": 2, "window_shape": [5, 4],
              "window_end": {"epoch": 0, "index": 5, "offset": 7, "skipped": 2}}
    old = [{"positions": {"0": inside}, "batches": 2, "num_workers": 1, "world_size": 1}]
    new = rescale_data_state(old, rank=0, world_size=2, num_workers=1, resample=True)
    assert new["positions"]["0"] == {"epoch": 0, "index": 6, "offset": 0, "skipped": 2}


def test_too_few_shards_for_distinct_splits_is_an_error(shard_dir):
    sources = resolve_sources([(os.path.join(shard_dir, "shard-00000[01].tar"), 1.0)])
    with pytest.raises(ValueError, match="resample=false needs at least"):
        ShardStream(sources, rank=0, world_size=2, num_workers=2, seed=0, resample=False, batch_size=2,
                    image_size=IMAGE_SIZE, clean_captions=True, max_caption_words=50)


def test_weighted_mix_follows_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(((f"a{k}", img, cap) for k, img, cap in synthetic_samples(20, seed=2, image_size=16)),
                 str(a), samples_per_shard=5, progress=False)
    write_shards(((f"b{k}", img, cap) for k, img, cap in synthetic_samples(20, seed=3, image_size=16)),
                 str(b), samples_per_shard=5, progress=False)
    sources = resolve_sources([(str(a / "*.tar"), 3.0), (str(b / "*.tar"), 1.0)])
    stream = ShardStream(sources, rank=0, world_size=1, num_workers=1, seed=0, resample=True, batch_size=1,
                         image_size=16, clean_captions=True, max_caption_words=50)
    picks = [stream.shard_at(0, 0, i) for i in range(4000)]
    frac_a = sum("/a/" in p for p in picks) / len(picks)
    assert 0.72 < frac_a < 0.78


def test_missing_pattern_is_an_error_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        resolve_sources([(str(tmp_path / "nothing-here-*.tar"), 1.0)])


def _jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_and_counted(tmp_path):
    shard = tmp_path / "bad-000000.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "good1.jpg", _jpeg("red"))
        _add(tar, "good1.json", json.dumps({"caption": "A red thing."}).encode())
        _add(tar, "corrupt.jpg", _jpeg("blue")[:40])  # truncated JPEG
        _add(tar, "corrupt.json", json.dumps({"caption": "blue"}).encode())
        _add(tar, "nocap.jpg", _jpeg("green"))
        _add(tar, "nocap.json", json.dumps({"url": "x"}).encode())
        _add(tar, "good2.jpg", _jpeg("white"))
        _add(tar, "good2.json", json.dumps({"caption": "White!"}).encode())
    # A second shard cut in the middle: its readable samples are used, the rest is one skip.
    write_shards(synthetic_samples(6, seed=4, image_size=16), str(tmp_path / "w"), samples_per_shard=6, progress=False)
    data = open(os.path.join(tmp_path, "w", os.listdir(tmp_path / "w")[0]), "rb").read()
    (tmp_path / "bad-000001.tar").write_bytes(data[: len(data) // 2])
    sources = resolve_sources([(str(tmp_path / "bad-*.tar"), 1.0)])
    stream = ShardStream(sources, rank=0, world_size=1, num_workers=1, seed=0, resample=False, batch_size=1,
                         image_size=16, clean_captions=True, max_caption_words=50)
    got = []
    for _, caption, key, pos in stream.samples(0, {"epoch": 0, "index": 0, "offset": 0, "skipped": 0}):
        if pos["epoch"] > 0:  # one full pass over both shards
            break
        got.append((key, caption, pos["skipped"]))
    keys = [k for k, _, _ in got]
    assert "corrupt" not in keys and "nocap" not in keys
    assert ("good1", "a red thing", ) == got[keys.index("good1")][:2]
    assert ("good2", "white", ) == got[keys.index("good2")][:2]
    synthetic = [k for k in keys if k not in ("good1", "good2")]
    assert 1 <= len(synthetic) < 6  # the readable part of the truncated shard, not all of it
    # 2 bad samples in the first shard + 1 for the truncated tail of the second
    assert max(s for _, _, s in got) >= 2
    bl = loader(sources, resample=False, batch_size=1)
    for _ in range(7):  # one pass (6 good samples) and into the next
        next(bl)
    assert bl.skipped >= 3


def test_cc_sbu_align_folder_reads_directly(tmp_path):
    """Stage 2 can train on the original cc_sbu_align folder without making shards first."""
    root = tmp_path / "cc_sbu_align"
    (root / "image").mkdir(parents=True)
    annotations = []
    for i in range(70):
        if i != 5:  # image 5 is missing: a counted skip
            (root / "image" / f"{i}.jpg").write_bytes(_jpeg((i * 3, 100, 200)))
        annotations.append({"image_id": str(i), "caption": f"Caption number {i}. Verbatim!"})
    (root / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    sources = resolve_sources([(str(root), 1.0)])
    assert [len(s.shards) for s in sources] == [2]  # 70 samples in virtual shards of 64
    stream = ShardStream(sources, rank=0, world_size=1, num_workers=1, seed=0, resample=False, batch_size=1,
                         image_size=16, clean_captions=False, max_caption_words=50)
    got = {}
    for _, caption, key, pos in stream.samples(0, {"epoch": 0, "index": 0, "offset": 0, "skipped": 0}):
        if pos["epoch"] > 0:
            break
        got[key] = (caption, pos["skipped"])
    assert len(got) == 69 and "5" not in got
    assert got["7"][0] == "Caption number 7. Verbatim!"  # stage-2 answers are not cleaned
    assert max(skipped for _, skipped in got.values()) == 1
