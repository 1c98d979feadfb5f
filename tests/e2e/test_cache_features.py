"""Cached vision features: what the towers compute, and training on them gives the uncached losses."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import TINY_STAGE1, read_metrics
from mgpt4_dist.config import load_config
from mgpt4_dist.data.samples import decode_feature_sample, decode_sample
from mgpt4_dist.data.shards import read_shard_samples
from mgpt4_dist.data.transforms import build_image_transform
from mgpt4_dist.models.minigpt4 import build_vision_towers, compute_vision_features

CLI = [sys.executable, "-m", "mgpt4_dist.cli.cache_features"]


@pytest.fixture(scope="module")
def cached(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    proc = subprocess.run(CLI + ["--config", TINY_STAGE1, *tiny_assets["overrides"], "--out", str(out), "--dtype", "fp32",
                                 "--batch-size", "16"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cached features of 128 samples (0 skipped) into 4 shards" in proc.stdout
    return str(out)


def test_cached_features_equal_the_towers_output(tiny_assets, cached):
    cfg = load_config(TINY_STAGE1, tiny_assets["overrides"])
    towers = build_vision_towers(cfg.model, seed=cfg.train.seed)
    image_shard = sorted(os.listdir(os.path.dirname(tiny_assets["shards_pattern"])))[0]
    raws = list(read_shard_samples(os.path.join(os.path.dirname(tiny_assets["shards_pattern"]), image_shard)))[:4]
    images = torch.stack([decode_sample(r, build_image_transform(224), True, 50)[0] for r in raws])
    expected = compute_vision_features(*towers, images)
    cached_raws = list(read_shard_samples(os.path.join(cached, image_shard)))[:4]
    assert [r["__key__"] for r in cached_raws] == [r["__key__"] for r in raws]
    got = [decode_feature_sample(r, clean=True, max_words=50) for r in cached_raws]
    assert got[0][1] == decode_sample(raws[0], build_image_transform(224), True, 50)[1]
    assert torch.allclose(torch.stack([g[0] for g in got]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_training_on_features_matches_training_on_images(tiny_assets, cached, run_train, tmp_path):
    common = ["--config", TINY_STAGE1, *tiny_assets["overrides"], "train.max_steps=3", "train.log_every=1"]
    run_train(common + [f"run_dir={tmp_path / 'images'}"], launcher="none")
    run_train(common + [f"run_dir={tmp_path / 'features'}", f"data.shards=[{cached}/*.tar]", "data.features=true"],
              launcher="none")
    images = [m["loss"] for m in read_metrics(str(tmp_path / "images"))]
    features = [m["loss"] for m in read_metrics(str(tmp_path / "features"))]
    assert features == pytest.approx(images, rel=1e-5)


def test_image_shards_with_features_flag_are_a_counted_error(tiny_assets):
    raw = next(read_shard_samples(tiny_assets["shards_pattern"].replace("*", "shard-000000")))
    from mgpt4_dist.data import BadSampleError

    with pytest.raises(BadSampleError, match="mgpt4-cache-features"):
        decode_feature_sample(raw, clean=True, max_words=50)


def test_features_use_the_vit_precision_training_uses(tiny_assets, tmp_path):
    """model.vit_precision=bf16 under fp32 training: the cache holds what the training model computes."""
    import dataclasses

    from mgpt4_dist.cache_features import cache_features
    from mgpt4_dist.models.minigpt4 import build_minigpt4

    shard = tiny_assets["shards_pattern"].replace("*", "shard-000000")
    cfg = load_config(TINY_STAGE1, [*tiny_assets["overrides"], f"data.shards=[{shard}]", "model.vit_precision=bf16"])
    cache_features(cfg, str(tmp_path), batch_size=8, store_dtype="fp32", progress=False)
    raws = list(read_shard_samples(shard))[:4]
    images = torch.stack([decode_sample(r, build_image_transform(224), True, 50)[0] for r in raws])
    model = build_minigpt4(cfg.model, seed=cfg.train.seed)
    assert next(model.visual_encoder.parameters()).dtype == torch.bfloat16
    expected = compute_vision_features(model.visual_encoder, model.qformer, getattr(model, "ln_vision", None), images)
    got = torch.stack([decode_feature_sample(r, clean=True, max_words=50)[0]
                       for r in list(read_shard_samples(str(tmp_path / "shard-000000.tar")))[:4]])
    assert torch.equal(got, expected)
    fp32_vit = compute_vision_features(*build_vision_towers(dataclasses.replace(cfg.model, vit_precision="fp32"),
                                                            seed=cfg.train.seed), images)
    assert not torch.equal(got, fp32_vit)  # the ViT's dtype shows in the features
