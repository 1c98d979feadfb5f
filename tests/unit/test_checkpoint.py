"""Checkpoint bookkeeping without processes: RNG state, pruning, resume paths, data-position rescaling."""
import os
import random

import numpy as np
import pytest
import torch

from mgpt4_dist.checkpoint import _prune, _write_latest, find_resume_point, rng_state, set_rng_state
from mgpt4_dist.config import load_config
from mgpt4_dist.data.pipeline import rescale_data_state


def test_rng_state_covers_python_numpy_torch_and_round_trips(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    assert {"python", "numpy", "torch"} <= set(state) and ("cuda" in state) == torch.cuda.is_available()
    path = str(tmp_path / "s.pt")
    torch.save(state, path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True))  # weights-only loadable
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_prune_keeps_last_and_removes_stale_temp_folders(tmp_path):
    root = str(tmp_path)
    for step in (1, 2, 3, 4):
        os.makedirs(os.path.join(root, f"step_{step:08d}"))
    os.makedirs(os.path.join(root, ".tmp-step_00000005"))  # left by a save killed mid-way
    _write_latest(root, "step_00000004")
    _prune(root, keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000004"]


def test_find_resume_point_accepts_step_checkpoints_and_run_folders(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000007").mkdir(parents=True)
    _write_latest(str(run / "checkpoints"), "step_00000007")
    for target in (run, run / "checkpoints", run / "checkpoints" / "step_00000007"):
        cfg = load_config(None, [f"checkpoint.resume={target}", f"run_dir={tmp_path / 'other'}"])
        assert find_resume_point(cfg).path == str(run / "checkpoints" / "step_00000007")
    cfg = load_config(None, [f"run_dir={tmp_path / 'fresh'}"])
    assert find_resume_point(cfg) is None  # auto, nothing there yet


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

    paths = build_tiny_assets(str(tmp_path / "assets"), num_samples=64, samples_per_shard=16)
    sources = resolve_sources([(paths["shards_pattern"], 1.0)])
    start = rescale_data_state(old_states(2, 1, lambda r, w: 2), 0, 1, 1, resample=True)
    stream = ShardStream(sources, rank=0, world_size=1, num_workers=1, seed=0, resample=True, batch_size=2,
                         image_size=224, clean_captions=True, max_caption_words=50, start=start)
    batch = next(iter(stream))
    assert batch["stream"] == 0 and batch["position"]["index"] == 3 and batch["position"]["offset"] == 2


class _SavedShapes:
    """A checkpoint reader reduced to what check_model_fits asks of it."""

    def __init__(self, shapes):
        self._shapes = shapes

    def shapes(self):
        return {k: torch.Size(v) for k, v in self._shapes.items()}


@pytest.mark.parametrize("saved,message", [
    ({"llama_proj.weight": (64, 64 * 4), "llama_proj.bias": (64,)}, "another visual feature width"),
    ({"llama_proj.weight": (128, 64), "llama_proj.bias": (128,)}, "LLM of hidden size 128, the config has 64"),
    ({"llama_proj.weight": (64, 64)}, r"missing \['llama_proj.bias'\]"),
])
def test_checkpoint_of_another_variant_or_width_is_refused(saved, message):
    from mgpt4_dist.checkpoint import CheckpointMismatch, ResumePoint, check_model_fits

    model = torch.nn.Module()
    model.llama_proj = torch.nn.Linear(64, 64)  # Q-Former width 64 -> LLM width 64, as the tiny config
    point = ResumePoint("/runs/x/checkpoints", "step_00000002")
    with pytest.raises(CheckpointMismatch, match=message):
        check_model_fits(point, model, reader=_SavedShapes(saved))
    check_model_fits(point, model, reader=_SavedShapes({"llama_proj.weight": (64, 64), "llama_proj.bias": (64,)}))
