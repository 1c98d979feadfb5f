"""Data positions on a resume with another world size or worker count (`rescale_data_state` of
mgpt4_dist.data.pipeline): every new stream starts past everything the old streams consumed."""
import pytest

from mgpt4_dist.data.pipeline import rescale_data_state


def old_states(world, workers, index_of):
    return [{"positions": {str(r * workers + w): {"epoch": 0, "index": index_of(r, w), "offset": 5, "skipped": 1}
                           for w in range(workers)}, "batches": 7, "num_workers": workers, "world_size": world}
            for r in range(world)]


@pytest.mark.parametrize("new_world,new_workers", [(1, 1), (4, 2), (2, 1)])
def test_rescaled_resampled_streams_start_past_every_consumed_pick(new_world, new_workers):
    olds = old_states(2, 2, lambda r, w: 3 + r * 2 + w)  # largest pick index reached: 6
    states = [rescale_data_state(olds, rank, new_world, new_workers, resample=True) for rank in range(new_world)]
    streams = [s for st in states for s in st["positions"]]
    assert sorted(map(int, streams)) == list(range(new_world * new_workers))  # every new stream, once
    for st in states:
        assert st["batches"] == 0 and st["num_workers"] == new_workers and st["world_size"] == new_world
        for pos in st["positions"].values():
            assert pos["index"] == 7 and pos["offset"] == 0  # no (stream, pick) is read twice
    assert sum(p["skipped"] for st in states for p in st["positions"].values()) == 4  # bad samples still counted


def test_rescaled_epoch_streams_start_the_next_pass():
    olds = old_states(2, 1, lambda r, w: 1)
    olds[1]["positions"]["1"]["epoch"] = 2
    st = rescale_data_state(olds, 0, 1, 2, resample=False)
    assert [p["epoch"] for p in st["positions"].values()] == [3, 3]
    assert all(p["index"] == 0 and p["offset"] == 0 for p in st["positions"].values())


def test_rescaled_state_is_what_the_loader_resumes_from(tmp_path):
    """The new streams read from the rescaled positions (a real shard stream, no processes)."""
    from mgpt4_dist.tiny.assets import build_tiny_assets
    from mgpt4_dist.data.pipeline import ShardStream, resolve_sources

    paths = build_tiny_assets(str(tmp_path / "assets"), num_samples=64, samples_per_shard=16, pretrained=False)
    sources = resolve_sources([(paths["shards_pattern"], 1.0)])
    start = rescale_data_state(old_states(2, 1, lambda r, w: 2), 0, 1, 1, resample=True)
    stream = ShardStream(sources, rank=0, world_size=1, num_workers=1, seed=0, resample=True, batch_size=2,
                         image_size=224, clean_captions=True, max_caption_words=50, start=start)
    batch = next(iter(stream))
    assert batch["stream"] == 0 and batch["position"]["index"] == 3 and batch["position"]["offset"] == 2
