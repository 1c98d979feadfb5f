"""Run the frozen vision towers once over the shards and store their output as new shards.

ViT, ln_vision and the Q-Former are frozen and MiniGPT-4's image transform is deterministic, so
what they compute for a sample never changes: training with `data.features=true` on the cached
shards gives the same loss as on the images while skipping the towers (most of a stage-1 step).
Each input shard becomes one output shard of the same name holding, per sample, `KEY.npy`
(features [image tokens, width]) and the original `KEY.json`/`KEY.txt`, written through
`shards.ShardWriter` (complete shards only; `--out` may be an object-store URL such as `s3://b/p`,
each shard uploaded when complete).
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import List

import torch

from mgpt4_dist.checkpoint.state import proj_state_for
from mgpt4_dist.config import ConfigError, JobConfig, ModelConfig, precision_dtype, shard_sources
from mgpt4_dist.data.pipeline import Source, resolve_sources
from mgpt4_dist.data import BadSampleError
from mgpt4_dist.data.remote import is_object_store_url, join_url, upload_file
from mgpt4_dist.data.samples import FEATURES_FIELD, IMAGE_FIELDS, decode_sample, encode_features
from mgpt4_dist.data.shards import ShardWriter, read_shard_samples
from mgpt4_dist.data.transforms import build_image_transform
from mgpt4_dist.errors import InvalidInputError
from mgpt4_dist.models.weights import require_frozen_weights
from mgpt4_dist.models.minigpt4 import build_vision_towers, compute_vision_features, vision_feature_shape_of, vit_dtype

log = logging.getLogger(__name__)


@dataclass
class CacheReport:
    shards: List[str]
    samples: int
    skipped: int
    out_dir: str


def cache_features(cfg: JobConfig, out_dir: str, batch_size: int = 64, store_dtype: str = "fp16",
                   device: str = "cpu", progress: bool = True) -> CacheReport:
    from tqdm import tqdm

    require_frozen_weights(cfg.model)
    sources = resolve_sources([(s.pattern, s.weight) for s in shard_sources(cfg.data)], cfg.data.retries,
                              cfg.data.retry_backoff_s)
    check_sources_kind(sources, False, cfg.model)  # its input: images, not features
    shards = sorted({shard for source in sources for shard in source.shards})
    # A cc_sbu_align folder's virtual shards (FOLDER#alignK) become FOLDER-alignK.tar.
    names = [os.path.basename(s) if "#" not in s else "-".join((os.path.basename(s.split("#")[0]), s.split("#")[1]))
             for s in shards]
    if len(set(names)) != len(names):
        raise InvalidInputError("data.shards: shards from different folders share file names; cache each source "
                                "separately (one mgpt4-cache-features run and --out per source)")
    vit, qformer, ln_vision = build_vision_towers(cfg.model, seed=cfg.train.seed, proj_source=proj_state_for(cfg.model))
    # In the dtypes training runs them in: the ViT in model.vit_precision, the rest in train.precision.
    train_dtype = precision_dtype(cfg.train.precision)
    vit.to(device=device, dtype=vit_dtype(cfg.model, train_dtype)).eval()
    for module in (qformer, ln_vision):
        if module is not None:
            module.to(device=device, dtype=train_dtype).eval()
    transform = build_image_transform(cfg.model.vit.img_size)
    out_dtype = precision_dtype(store_dtype)
    remote_out = is_object_store_url(out_dir)
    if not remote_out:
        os.makedirs(out_dir, exist_ok=True)
    written, samples, skipped = [], 0, 0
    bar = tqdm(total=len(shards), desc="caching features", unit="shard", disable=not progress, file=sys.stderr)
    for shard, name in zip(shards, names):
        writer = ShardWriter(join_url(out_dir, name if name.endswith(".tar") else name + ".tar"))
        pending: list = []

        def flush():
            if not pending:
                return
            images = torch.stack([image for _, image, _ in pending]).to(device)
            features = compute_vision_features(vit, qformer, ln_vision, images).to(out_dtype).cpu()
            for (key, _, raw), feats in zip(pending, features):
                members = [(f"{key}.{FEATURES_FIELD}", encode_features(feats))]
                members += [(f"{key}.{field}", raw[field]) for field in ("json", "txt") if field in raw]
                writer.add(members)
            pending.clear()

        try:
            try:
                for raw in read_shard_samples(shard, cfg.data.retries, cfg.data.retry_backoff_s):
                    try:
                        # Captions stay raw (cleaning happens at training time); only validated here.
                        image, _ = decode_sample(raw, transform, clean=False, max_words=10**6)
                    except BadSampleError as e:
                        skipped += 1
                        log.warning("skipping %s", e)
                        continue
                    pending.append((raw["__key__"], image, raw))
                    samples += 1
                    if len(pending) == batch_size:
                        flush()
            except (BadSampleError, OSError) as e:
                skipped += 1
                log.warning("skipping rest of %s: %s", shard, e)
            flush()
            written.append(writer.commit())
        except BaseException:
            writer.abort()
            raise
        bar.update(1)
    bar.close()
    summary = {"model": {**towers_summary(cfg.model), "vit_checkpoint": cfg.model.vit_checkpoint,
                         "qformer_checkpoint": cfg.model.qformer_checkpoint},
               "features_shape": list(vision_feature_shape_of(cfg.model)),
               "dtype": store_dtype, "samples": samples, "skipped": skipped}
    if remote_out:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(summary, f, indent=1)
        try:
            upload_file(f.name, join_url(out_dir, FEATURES_JSON))
        finally:
            os.remove(f.name)
    else:
        with open(os.path.join(out_dir, FEATURES_JSON), "w") as f:
            json.dump(summary, f, indent=1)
    return CacheReport(written, samples, skipped, out_dir)


FEATURES_JSON = "features.json"


def towers_summary(cfg: ModelConfig) -> dict:
    """What decides the cached features' values and shape (recorded in features.json)."""
    summary = {"vit": vars(cfg.vit), "has_qformer": cfg.has_qformer}
    if cfg.has_qformer:
        summary["qformer"] = vars(cfg.qformer)
    return summary


def _first_sample(shard: str):
    try:
        return next(iter(read_shard_samples(shard)), None)
    except (BadSampleError, OSError):
        return None  # unreadable: the stream skips it and counts it


def check_sources_kind(sources: List[Source], features: bool, model: ModelConfig) -> None:
    """Peek at the first sample of each source's first shard: images when data.features=false,
    cached features made for this model's towers when true. One clear error before training
    instead of every sample skipped, or a shape error deep in the forward."""
    expected = list(vision_feature_shape_of(model))
    for source in sources:
        shard = source.shards[0]
        raw = _first_sample(shard)
        if raw is None:
            continue
        has_image = any(f in raw for f in IMAGE_FIELDS)
        if not features:
            if FEATURES_FIELD in raw and not has_image:
                raise ConfigError(f"data.features=false but {shard} holds cached vision features ({raw['__key__']}."
                                  f"{FEATURES_FIELD}, from mgpt4-cache-features), not images: set data.features=true "
                                  f"or point data.shards at the image shards")
            continue
        if FEATURES_FIELD not in raw:
            raise ConfigError(f"data.features=true but {shard} holds "
                              + (f"images ({raw['__key__']}.{next(f for f in IMAGE_FIELDS if f in raw)})" if has_image
                                 else f"no cached features (fields {sorted(k for k in raw if not k.startswith('__'))})")
                              + ": run mgpt4-cache-features --out DIR on these shards and train on DIR/*.tar, "
                                "or set data.features=false")
        problem = _features_mismatch(os.path.join(os.path.dirname(shard), FEATURES_JSON), model)
        if problem is None:
            import numpy as np

            try:
                shape = list(np.load(io.BytesIO(raw[FEATURES_FIELD]), allow_pickle=False).shape)
            except (ValueError, OSError, EOFError):
                continue  # an unreadable sample is the stream's to skip and count
            if shape != expected:
                problem = f"its features have shape {shape}, this model takes {expected} (image tokens, width)"
        if problem:
            raise ConfigError(f"data.features=true: {shard} was cached for another model: {problem}. Recompute "
                              f"the features with mgpt4-cache-features and this config, or fix model.*")


def _features_mismatch(path: str, model: ModelConfig) -> str | None:
    """Which recorded tower settings of a features.json differ from `model`, or None."""
    try:
        with open(path) as f:
            recorded = json.load(f).get("model", {})
    except (OSError, ValueError):
        return None
    ours = towers_summary(model)
    diffs = []
    for key in ("has_qformer", "vit", "qformer"):
        if key not in recorded or key not in ours:
            continue
        if isinstance(ours[key], dict):
            diffs += [f"model.{key}.{k} {recorded[key][k]} there, {v} here" for k, v in ours[key].items()
                      if k in recorded[key] and recorded[key][k] != v]
        elif recorded[key] != ours[key]:
            diffs.append(f"model.{key} {recorded[key]} there, {ours[key]} here")
    if diffs:
        return f"{path} records {'; '.join(diffs)}"
    for key in ("vit_checkpoint", "qformer_checkpoint"):
        if recorded.get(key, getattr(model, key)) != getattr(model, key):
            log.warning("%s: the features were computed with model.%s=%s, this run has %s (the same weights moved?)",
                        path, key, recorded[key] or '""', getattr(model, key) or '""')
    return None
