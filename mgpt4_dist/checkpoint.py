"""Checkpoint folders of a run: `RUN_DIR/checkpoints/step_NNNNNNNN/` plus a `latest` pointer.

A checkpoint is written into a hidden temp folder and renamed into place only when every rank
has finished; `latest` is updated after that and old checkpoints are pruned last, so a crash at
any point leaves the previous checkpoint loadable. `latest` holds the tag as plain text, the same
file DeepSpeed's own tools (e.g. `zero_to_fp32.py`) read.

Beside the engine's files each rank writes `trainer_state_rank{R}.pt` (step, data position, RNG
states): small, weights-only-loadable types only.
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

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{8})$")


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
    tmp = os.path.join(root, tmp_tag)
    os.makedirs(tmp, exist_ok=True)
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


def _write_latest(root: str, tag: str) -> None:
    tmp = os.path.join(root, ".latest.tmp")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(root, "latest"))


def list_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(name for name in os.listdir(root) if TAG_RE.match(name))


def _prune(root: str, keep_last: int) -> None:
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
            raise FileNotFoundError(f"{latest} points at {tag}, which does not exist")
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
    raise FileNotFoundError(f"checkpoint.resume={mode}: not a step_NNNNNNNN folder, a checkpoints folder or a run dir")


def load_trainer_state(point: ResumePoint, rank: int) -> dict:
    path = os.path.join(point.path, f"trainer_state_rank{rank}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written by fewer ranks "
                                f"(resuming on another world size is not supported yet)")
    return torch.load(path, map_location="cpu", weights_only=True)
