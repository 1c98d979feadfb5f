"""Saving and resuming a run's checkpoint (`save_checkpoint`, `load_checkpoint`): the protocol.
Where the folders live is `mgpt4_dist.checkpoint.layout`; what they hold besides the engine's own
files is `mgpt4_dist.checkpoint.state`.

A checkpoint is written into a hidden temp folder and renamed into place only when every rank
has finished; `latest` is updated after that and old checkpoints are pruned last, so a crash at
any point leaves the previous checkpoint loadable. `latest` holds the tag as plain text, the same
file DeepSpeed's own tools (e.g. `zero_to_fp32.py`) read.

Beside the engine's files each rank writes `trainer_state_rank{R}.pt` (step, data position, RNG
states): small, weights-only-loadable types only; rank 0 writes `trainable_state.safetensors`, the
engine-neutral trainable state gathered by `Engine.get_full_state` (fp32 llama_proj, Adam moments,
Adam step, lr schedule, counters; see `write_trainable_state` for its keys). That file is the one
source of consolidation, export, `model.proj_checkpoint` and resharded resume; the engine's own
files serve a resume on the same engine and layout, and DeepSpeed's tools (`zero_to_fp32.py`).

Resuming (`load_checkpoint`):
- same world size and engine layout (`Engine.layout()`, recorded as meta.json's `layout`: the
  backend, and the ZeRO stage for DeepSpeed): the engine's own loader, each rank's
  trainer state and RNG states as saved: the run continues bit for bit;
- another backend (DeepSpeed ZeRO 0-3 <-> FSDP2), world size or ZeRO stage: the checkpoint is
  resharded. `trainable_state.safetensors` gives the full fp32 master weights and Adam moments,
  with the Adam step, lr schedule and counters (steps, fp16 loss scale); `Engine.load_full_state`
  writes them into the new engine's shards and reads them back for an exact comparison before
  training. Nothing here knows either engine's internals.
- data position: with the same world size (and data.num_workers) the streams are the same, so
  every rank continues its own position and RNG exactly, whatever the engine; otherwise the
  positions are rescaled (`rescale_data_state`: fresh deterministic positions past everything
  consumed) and ranks without a saved RNG state get one derived from (seed, step, rank).
Before either, the trainable tensor shapes are compared with the configured model, so a checkpoint
for another LLM width or variant fails with a clear message before training.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from typing import Dict, Optional

import numpy as np
import torch

from mgpt4_dist import dist, testing_hooks
from mgpt4_dist.checkpoint.layout import (TMP_PREFIX, ResumePoint, checkpoints_dir, prune, read_meta,
                                          saved_world_size, step_tag, write_latest)
from mgpt4_dist.checkpoint.state import (TRAINABLE_STATE, TrainableState, load_trainer_state, rng_state,
                                         trainer_state_file, write_trainable_state)
from mgpt4_dist.config import JobConfig, save_config
from mgpt4_dist.errors import CheckpointMismatchError
from mgpt4_dist.models.weights import proj_shape_hint
from mgpt4_dist.parallel.base import layout_name

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- saving

def save_checkpoint(engine, cfg: JobConfig, step: int, trainer_state: dict, rank: int) -> str:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root = checkpoints_dir(cfg.run_dir)
    tag = step_tag(step)
    tmp_tag = TMP_PREFIX + tag
    final = os.path.join(root, tag)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(os.path.join(root, tmp_tag), ignore_errors=True)
    dist.barrier()
    engine.save(root, tmp_tag)
    full_state = engine.get_full_state()  # collective: every rank gathers, rank 0 writes
    testing_hooks.pause_in_save(step)
    tmp = os.path.join(root, tmp_tag)
    os.makedirs(tmp, exist_ok=True)
    if rank == 0:
        write_trainable_state(full_state, os.path.join(tmp, TRAINABLE_STATE))
    del full_state
    state = {**trainer_state, "step": step, "rng": rng_state()}
    torch.save(state, trainer_state_file(tmp, rank))
    dist.barrier()
    if rank == 0:
        save_config(cfg, os.path.join(tmp, "config.yaml"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "world_size": trainer_state.get("world_size"),
                       "backend": cfg.parallel.backend, "zero_stage": cfg.parallel.zero_stage,
                       "layout": engine.layout()}, f)
        if os.path.exists(final):  # a re-save of the same step (e.g. after resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_latest(root, tag)
        prune(root, cfg.checkpoint.keep_last)
    dist.barrier()
    return final


# --------------------------------------------------------------------------- resuming

def check_model_fits(point: ResumePoint, wanted: Dict[str, tuple], reader: Optional[TrainableState] = None) -> None:
    """Fail before training when the checkpoint's trainable tensors do not fit the configured model;
    `wanted`: {name: whole shape} of the model's trainable parameters (`Engine.trainable_shapes`)."""
    saved = (reader or TrainableState(point.path)).shapes()
    problems = [f"missing {sorted(set(wanted) - set(saved))}"] if set(wanted) - set(saved) else []
    if set(saved) - set(wanted):
        problems.append(f"unexpected {sorted(set(saved) - set(wanted))}")
    for name in sorted(set(saved) & set(wanted)):
        got, want = tuple(saved[name]), wanted[name]
        if got != want:
            hint = f": {proj_shape_hint(got, want)}" if name == "llama_proj.weight" else ""
            problems.append(f"{name} has shape {list(got)} but the model expects {list(want)}{hint}")
    if problems:
        raise CheckpointMismatchError(f"{point.path} does not fit the configured model: " + "; ".join(problems))


def load_checkpoint(engine, point: ResumePoint, cfg: JobConfig, rank: int, world_size: int) -> dict:
    """Restore engine + trainer state from `point`; returns this rank's trainer state (data, step, rng).

    Collective. See the module docstring for the same-layout and resharded paths.
    """
    from mgpt4_dist.data.pipeline import rescale_data_state

    old_world = saved_world_size(point.path)  # also refuses a folder without meta.json
    meta = read_meta(point.path)
    old_layout = meta.get("layout") or layout_name(  # a meta.json written before it named the layout
        meta.get("backend", "deepspeed"), int(meta.get("zero_stage", cfg.parallel.zero_stage)))
    same_layout = old_world == world_size and old_layout == engine.layout()
    saved = None
    if same_layout and not os.path.isfile(os.path.join(point.path, TRAINABLE_STATE)):
        # Written before every checkpoint had the file: the engine reads its own files (and checks
        # their shapes itself); the next checkpoint of this run has the file.
        log.warning("%s has no %s (an older checkpoint): resuming through the engine's own files",
                    point.path, TRAINABLE_STATE)
    else:
        saved = TrainableState(point.path)
        check_model_fits(point, engine.trainable_shapes(), saved)
    if same_layout:
        engine.load(point.root, point.tag)
    else:
        log.info("resharding %s: written by %d ranks (%s), resuming on %d ranks (%s)", point.path, old_world,
                 old_layout, world_size, engine.layout())
        load_resharded(engine, saved)
    workers = max(1, cfg.data.num_workers)
    if old_world == world_size:
        # The same streams (rank x worker) exist again, whatever the engine: each rank continues its
        # own data position and RNG exactly.
        state = load_trainer_state(point.path, rank)
        if state["data"].get("num_workers", workers) != workers:
            olds = [load_trainer_state(point.path, r)["data"] for r in range(old_world)]
            state["data"] = rescale_data_state(olds, rank, world_size, cfg.data.num_workers, cfg.data.resample)
        return state
    olds = [load_trainer_state(point.path, r) for r in range(old_world)]
    step = int(olds[0]["step"])
    state = {"step": step, "nonfinite_steps": olds[0].get("nonfinite_steps", 0),
             "data": rescale_data_state([o["data"] for o in olds], rank, world_size, cfg.data.num_workers,
                                        cfg.data.resample)}
    if rank < old_world:
        state["rng"] = olds[rank]["rng"]
    else:  # a rank the old run did not have: a fresh stream, still a pure function of the run
        seed = cfg.train.seed * 1_000_003 + step * 1009 + rank
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        state["rng"] = rng_state()
    return state


def load_resharded(engine, saved: TrainableState) -> None:
    """Write a checkpoint's full fp32 weights, Adam moments, Adam step, lr schedule and counters (its
    trainable state, whichever engine wrote it) into an engine of another layout; the engine reads them
    back and compares exactly (`Engine.load_full_state`). Only llama_proj trains, so the full tensors
    are held at once: a few MB even for the 13B LLM."""
    state = saved.full_state()
    engine.load_full_state(state)
    log.info("resharded resume: %d tensors, their Adam moments (step %s) and the lr schedule restored and verified",
             len(state.weights), state.adam_step)
