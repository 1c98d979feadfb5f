"""Checkpoint folders of a run: `RUN_DIR/checkpoints/step_NNNNNNNN/` plus a `latest` pointer.

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
- same backend, world size (and ZeRO stage for DeepSpeed): the engine's own loader, each rank's
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
import re
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from mgpt4_dist import dist
from mgpt4_dist.config import JobConfig, save_config
from mgpt4_dist.errors import MissingFileError, UserError
from mgpt4_dist.trainable_state import TAG_RE, TRAINABLE_STATE, TrainableState, write_trainable_state

log = logging.getLogger(__name__)


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


# --------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- saving

def save_checkpoint(engine, cfg: JobConfig, step: int, trainer_state: dict, rank: int) -> str:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root = checkpoints_dir(cfg.run_dir)
    tag = step_tag(step)
    tmp_tag = f".tmp-{tag}"
    final = os.path.join(root, tag)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(os.path.join(root, tmp_tag), ignore_errors=True)
    dist.barrier()
    engine.save(root, tmp_tag)
    full_state = engine.get_full_state()  # collective: every rank gathers, rank 0 writes
    _test_pause(step)
    tmp = os.path.join(root, tmp_tag)
    os.makedirs(tmp, exist_ok=True)
    if rank == 0:
        write_trainable_state(full_state, os.path.join(tmp, TRAINABLE_STATE))
    del full_state
    state = {**trainer_state, "step": step, "rng": rng_state()}
    torch.save(state, os.path.join(tmp, f"trainer_state_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        save_config(cfg, os.path.join(tmp, "config.yaml"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "world_size": trainer_state.get("world_size"),
                       "backend": cfg.parallel.backend, "zero_stage": cfg.parallel.zero_stage}, f)
        if os.path.exists(final):  # a re-save of the same step (e.g. after resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_latest(root, tag)
        _prune(root, cfg.checkpoint.keep_last)
    dist.barrier()
    return final


def _test_pause(step: int) -> None:
    """Test hook: MGPT4_TEST_SAVE_PAUSE=STEP:SECONDS sleeps between the engine's save and the rename,
    so a test can kill -9 the job while a checkpoint is half written."""
    spec = os.environ.get("MGPT4_TEST_SAVE_PAUSE", "")
    if spec and int(spec.split(":")[0]) == step:
        import time

        print(f"MGPT4_TEST_SAVE_PAUSE: pausing in save of step {step}", flush=True)
        time.sleep(float(spec.split(":")[1]))


def _write_latest(root: str, tag: str) -> None:
    tmp = os.path.join(root, ".latest.tmp")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(root, "latest"))


def list_checkpoints(root: str) -> list[str]:
    try:
        return sorted(name for name in os.listdir(root) if TAG_RE.match(name))
    except OSError:  # none yet (or rank 0 is deleting it under run.overwrite)
        return []


def _prune(root: str, keep_last: int) -> None:
    """After a checkpoint is complete: drop old ones beyond keep_last, and temp folders that a
    killed save left behind (never the one being written: saves are collective and sequential)."""
    for name in os.listdir(root):
        if name.startswith(".tmp-step_"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last <= 0:
        return
    for name in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# --------------------------------------------------------------------------- resuming

@dataclass
class ResumePoint:
    root: str  # folder holding the step_* folders
    tag: str

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.tag)


def find_resume_point(cfg: JobConfig) -> Optional[ResumePoint]:
    """checkpoint.resume: auto (this run's `latest`, if any) | never | PATH (a step folder or a run dir)."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    if mode == "auto":
        root = checkpoints_dir(cfg.run_dir)
        latest = os.path.join(root, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            tag = f.read().strip()
        if not os.path.isdir(os.path.join(root, tag)):
            raise MissingFileError(f"{latest} points at {tag}, which does not exist")
        return ResumePoint(root, tag)
    path = os.path.abspath(mode)
    if os.path.isfile(os.path.join(path, "checkpoints", "latest")):  # a run dir
        with open(os.path.join(path, "checkpoints", "latest")) as f:
            return ResumePoint(os.path.join(path, "checkpoints"), f.read().strip())
    if os.path.isfile(os.path.join(path, "latest")):  # a checkpoints dir
        with open(os.path.join(path, "latest")) as f:
            return ResumePoint(path, f.read().strip())
    if os.path.isdir(path) and TAG_RE.match(os.path.basename(path)):
        return ResumePoint(os.path.dirname(path), os.path.basename(path))
    raise MissingFileError(f"checkpoint.resume={mode}: not a step_NNNNNNNN folder, a checkpoints folder or a run dir")


def load_trainer_state(point: ResumePoint, rank: int) -> dict:
    path = os.path.join(point.path, f"trainer_state_rank{rank}.pt")
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} is missing: the checkpoint is incomplete")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint_meta(point: ResumePoint) -> dict:
    path = os.path.join(point.path, "meta.json")
    if not os.path.isfile(path):
        raise MissingFileError(f"{point.path}: no meta.json; not a complete mgpt4-train checkpoint")
    with open(path) as f:
        return json.load(f)


def saved_world_size(point: ResumePoint) -> int:
    meta = read_checkpoint_meta(point)
    if meta.get("world_size"):
        return int(meta["world_size"])
    return len([n for n in os.listdir(point.path) if re.match(r"^trainer_state_rank\d+\.pt$", n)])


def check_model_fits(point: ResumePoint, model: torch.nn.Module, reader: Optional[TrainableState] = None) -> None:
    """Fail before training when the checkpoint's trainable tensors do not fit the configured model."""
    from mgpt4_dist.models.build import full_shape

    saved = (reader or TrainableState(point.path)).shapes()
    # Whole shapes: ZeRO-3 leaves empty placeholders in the module; FSDP's DTensors report theirs.
    wanted = {n: full_shape(p) for n, p in model.named_parameters() if p.requires_grad}
    problems = [f"missing {sorted(set(wanted) - set(saved))}"] if set(wanted) - set(saved) else []
    if set(saved) - set(wanted):
        problems.append(f"unexpected {sorted(set(saved) - set(wanted))}")
    for name in sorted(set(saved) & set(wanted)):
        got, want = tuple(saved[name]), wanted[name]
        if got != want:
            hint = ""
            if name == "llama_proj.weight" and got[0] != want[0]:
                hint = (f": this checkpoint is for an LLM of hidden size {got[0]}, the config has {want[0]} "
                        f"(model.llm_path)")
            elif name == "llama_proj.weight":
                hint = (": the checkpoint was made for another visual feature width "
                        "(Q-Former vs the Llama-2 variant, model.has_qformer / model.qformer.hidden_size)")
            problems.append(f"{name} has shape {list(got)} but the model expects {list(want)}{hint}")
    if problems:
        raise CheckpointMismatch(f"{point.path} does not fit the configured model: " + "; ".join(problems))


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint made for another model."""


def load_checkpoint(engine, point: ResumePoint, cfg: JobConfig, rank: int, world_size: int) -> dict:
    """Restore engine + trainer state from `point`; returns this rank's trainer state (data, step, rng).

    Collective. See the module docstring for the same-layout and resharded paths.
    """
    from mgpt4_dist.data.pipeline import rescale_data_state

    meta = read_checkpoint_meta(point)
    old_world = saved_world_size(point)
    old_backend = meta.get("backend", "deepspeed")
    same_stage = int(meta.get("zero_stage", cfg.parallel.zero_stage)) == cfg.parallel.zero_stage
    # FSDP has no ZeRO stage: its checkpoints record the config's unused default.
    same_layout = (old_world == world_size and old_backend == cfg.parallel.backend
                   and (same_stage or cfg.parallel.backend != "deepspeed"))
    saved = None
    if same_layout and not os.path.isfile(os.path.join(point.path, TRAINABLE_STATE)):
        # Written before every checkpoint had the file: the engine reads its own files (and checks
        # their shapes itself); the next checkpoint of this run has the file.
        log.warning("%s has no %s (an older checkpoint): resuming through the engine's own files",
                    point.path, TRAINABLE_STATE)
    else:
        saved = TrainableState(point.path)
        check_model_fits(point, engine.module, saved)
    if same_layout:
        engine.load(point.root, point.tag)
    else:
        log.info("resharding %s: written by %d ranks (%s), resuming on %d ranks (%s)", point.path, old_world,
                 _layout(old_backend, meta.get("zero_stage")), world_size,
                 _layout(cfg.parallel.backend, cfg.parallel.zero_stage))
        load_resharded(engine, saved)
    workers = max(1, cfg.data.num_workers)
    if old_world == world_size:
        # The same streams (rank x worker) exist again, whatever the engine: each rank continues its
        # own data position and RNG exactly.
        state = load_trainer_state(point, rank)
        if state["data"].get("num_workers", workers) != workers:
            olds = [load_trainer_state(point, r)["data"] for r in range(old_world)]
            state["data"] = rescale_data_state(olds, rank, world_size, cfg.data.num_workers, cfg.data.resample)
        return state
    olds = [load_trainer_state(point, r) for r in range(old_world)]
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


def _layout(backend: str, zero_stage) -> str:
    return f"deepspeed ZeRO-{zero_stage}" if backend == "deepspeed" else backend


def load_resharded(engine, saved: TrainableState) -> None:
    """Write a checkpoint's full fp32 weights, Adam moments, Adam step, lr schedule and counters (its
    trainable state, whichever engine wrote it) into an engine of another layout; the engine reads them
    back and compares exactly (`Engine.load_full_state`). Only llama_proj trains, so the full tensors
    are held at once: a few MB even for the 13B LLM."""
    state = saved.full_state()
    engine.load_full_state(state)
    log.info("resharded resume: %d tensors, their Adam moments (step %s) and the lr schedule restored and verified",
             len(state.weights), state.adam_step)
