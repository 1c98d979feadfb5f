"""Run the frozen vision towers once over the shards and store their output as new shards.

ViT, ln_vision and the Q-Former are frozen and MiniGPT-4's image transform is deterministic, so
what they compute for a sample never changes: training with `data.features=true` on the cached
shards gives the same loss as on the images while skipping the towers (most of a stage-1 step).
Each input shard becomes one output shard of the same name holding, per sample, `KEY.npy`
(features [image tokens, width]) and the original `KEY.json`/`KEY.txt`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import tarfile
from dataclasses import dataclass
from typing import List

import torch

from mgpt4_dist.config import JobConfig, shard_sources
from mgpt4_dist.data.pipeline import resolve_sources
from mgpt4_dist.data.shards import BadSampleError, FEATURES_FIELD, decode_sample, encode_features, read_shard_samples
from mgpt4_dist.data.transforms import build_image_transform
from mgpt4_dist.errors import InvalidInputError
from mgpt4_dist.models.minigpt4 import build_vision_towers, compute_vision_features, vit_dtype
from mgpt4_dist.parallel.engine import PRECISION_DTYPES

log = logging.getLogger(__name__)


@dataclass
class CacheReport:
    shards: List[str]
    samples: int
    skipped: int
    out_dir: str


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def cache_features(cfg: JobConfig, out_dir: str, batch_size: int = 64, store_dtype: str = "fp16",
                   device: str = "cpu", progress: bool = True) -> CacheReport:
    from tqdm import tqdm

    sources = resolve_sources([(s.pattern, s.weight) for s in shard_sources(cfg.data)])
    shards = sorted({shard for source in sources for shard in source.shards})
    # A cc_sbu_align folder's virtual shards (FOLDER#alignK) become FOLDER-alignK.tar.
    names = [os.path.basename(s) if "#" not in s else "-".join((os.path.basename(s.split("#")[0]), s.split("#")[1]))
             for s in shards]
    if len(set(names)) != len(names):
        raise InvalidInputError("data.shards: shards from different folders share file names; cache each source "
                                "separately (one mgpt4-cache-features run and --out per source)")
    vit, qformer, ln_vision = build_vision_towers(cfg.model, seed=cfg.train.seed)
    # In the dtypes training runs them in: the ViT in model.vit_precision, the rest in train.precision.
    train_dtype = PRECISION_DTYPES[cfg.train.precision]
    vit.to(device=device, dtype=vit_dtype(cfg.model, train_dtype)).eval()
    for module in (qformer, ln_vision):
        if module is not None:
            module.to(device=device, dtype=train_dtype).eval()
    transform = build_image_transform(cfg.model.vit.img_size)
    out_dtype = PRECISION_DTYPES[store_dtype]
    os.makedirs(out_dir, exist_ok=True)
    written, samples, skipped = [], 0, 0
    bar = tqdm(total=len(shards), desc="caching features", unit="shard", disable=not progress, file=sys.stderr)
    for shard, name in zip(shards, names):
        final = os.path.join(out_dir, name if name.endswith(".tar") else name + ".tar")
        tmp = final + ".tmp"
        with tarfile.open(tmp, "w") as tar:
            pending: list = []

            def flush():
                if not pending:
                    return
                images = torch.stack([image for _, image, _ in pending]).to(device)
                features = compute_vision_features(vit, qformer, ln_vision, images).to(out_dtype).cpu()
                for (key, _, raw), feats in zip(pending, features):
                    _add(tar, f"{key}.{FEATURES_FIELD}", encode_features(feats))
                    for field in ("json", "txt"):
                        if field in raw:
                            _add(tar, f"{key}.{field}", raw[field])
                pending.clear()

            try:
                for raw in read_shard_samples(shard):
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
        os.replace(tmp, final)
        written.append(final)
        bar.update(1)
    bar.close()
    with open(os.path.join(out_dir, "features.json"), "w") as f:
        json.dump({"model": {"vit": vars(cfg.model.vit), "has_qformer": cfg.model.has_qformer,
                             "vit_checkpoint": cfg.model.vit_checkpoint,
                             "qformer_checkpoint": cfg.model.qformer_checkpoint},
                   "dtype": store_dtype, "samples": samples, "skipped": skipped}, f, indent=1)
    return CacheReport(written, samples, skipped, out_dir)
