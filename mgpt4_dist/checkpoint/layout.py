"""Where a run's checkpoints live and how a path names one: the on-disk layout, nothing else.

    RUN_DIR/checkpoints/step_NNNNNNNN/   one complete checkpoint (see `mgpt4_dist.checkpoint.manager`)
    RUN_DIR/checkpoints/latest           its tag as plain text (what DeepSpeed's `zero_to_fp32.py` reads)
    RUN_DIR/checkpoints/.tmp-step_*/     a save in progress, renamed into place when complete

Owns the tag format (`step_tag`, `TAG_RE`, `tag_step`), the `latest` pointer, pruning, the one
reader of `meta.json`, the one reader of a step folder's `config.yaml` (`read_step_config`,
`read_run_config`), and the two ways a user names a checkpoint: `checkpoint.resume`
(`find_resume_point`) and the path CLIs take (`resolve_step_dir`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

from mgpt4_dist.config import JobConfig, config_from_dict, read_yaml
from mgpt4_dist.errors import CheckpointMismatchError, MissingFileError

TAG_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
RANK_STATE_RE = re.compile(r"^trainer_state_rank\d+\.pt$")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> int:
    """The step of a `step_NNNNNNNN` tag."""
    match = TAG_RE.match(tag)
    if not match:
        raise ValueError(f"{tag!r} is not a step_NNNNNNNN checkpoint tag")
    return int(match.group(1))


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def write_latest(root: str, tag: str) -> None:
    tmp = os.path.join(root, ".latest.tmp")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(root, "latest"))


def read_latest(root: str) -> Optional[str]:
    """The tag `root/latest` points at, or None when there is no pointer."""
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def list_checkpoints(root: str) -> list[str]:
    try:
        return sorted(name for name in os.listdir(root) if TAG_RE.match(name))
    except OSError:  # none yet (or rank 0 is deleting it under run.overwrite)
        return []


def prune(root: str, keep_last: int) -> None:
    """After a checkpoint is complete: drop old ones beyond keep_last, and temp folders that a
    killed save left behind (never the one being written: saves are collective and sequential)."""
    for name in os.listdir(root):
        if name.startswith(TMP_PREFIX + "step_"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last <= 0:
        return
    for name in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def read_meta(step_dir: str) -> dict:
    """A step folder's meta.json (step, world_size, backend, zero_stage, layout), or {} when it has none."""
    path = os.path.join(step_dir, "meta.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_step_config(step_dir: str, required: bool = True) -> dict:
    """The config.yaml a step folder was trained with, as written (keys of another version stay
    readable). Missing: CheckpointMismatchError when `required`, else {}."""
    path = os.path.join(step_dir, "config.yaml")
    if not os.path.isfile(path):
        if required:
            raise CheckpointMismatchError(f"{step_dir}: no config.yaml (not a complete mgpt4-train checkpoint)")
        return {}
    return read_yaml(path, "checkpoint config")


def read_run_config(step_dir: str) -> JobConfig:
    """The config a step folder was trained with, typed; its config.yaml must exist."""
    return config_from_dict(read_step_config(step_dir))


@dataclass
class ResumePoint:
    root: str  # folder holding the step_* folders
    tag: str

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.tag)

    @property
    def step(self) -> int:
        return tag_step(self.tag)


def find_resume_point(cfg: JobConfig) -> Optional[ResumePoint]:
    """checkpoint.resume: auto (this run's `latest`, if any) | never | PATH (a step folder or a run dir)."""
    resume, run_dir = cfg.checkpoint.resume, cfg.run_dir
    if resume == "never":
        return None
    if resume == "auto":
        root = checkpoints_dir(run_dir)
        tag = read_latest(root)
        if tag is None:
            return None
        if not os.path.isdir(os.path.join(root, tag)):
            raise MissingFileError(f"{os.path.join(root, 'latest')} points at {tag}, which does not exist")
        return ResumePoint(root, tag)
    path = os.path.abspath(resume)
    for root in (os.path.join(path, "checkpoints"), path):  # a run dir, a checkpoints dir
        tag = read_latest(root)
        if tag is not None:
            return ResumePoint(root, tag)
    if os.path.isdir(path) and TAG_RE.match(os.path.basename(path)):
        return ResumePoint(os.path.dirname(path), os.path.basename(path))
    raise MissingFileError(f"checkpoint.resume={resume}: not a step_NNNNNNNN folder, a checkpoints folder or a run dir")


def resolve_step_dir(path: str) -> str:
    """A step folder, `.../checkpoints/latest`, a checkpoints folder or a run folder → the step folder."""
    path = os.path.abspath(path)
    if os.path.basename(path) == "latest":
        if os.path.isdir(path):  # a folder named latest: take it as is
            return path
        if not os.path.isfile(path):
            raise MissingFileError(f"{path}: no `latest` pointer there")
        return os.path.join(os.path.dirname(path), read_latest(os.path.dirname(path)))
    if not TAG_RE.match(os.path.basename(path)):
        for root in (path, os.path.join(path, "checkpoints")):
            tag = read_latest(root)
            if tag is not None:
                return os.path.join(root, tag)
    if not os.path.isdir(path):
        raise MissingFileError(f"{path}: no such checkpoint folder")
    return path


def saved_world_size(step_dir: str) -> int:
    """The world size that wrote a step folder: meta.json's, else its count of per-rank trainer states."""
    meta = read_meta(step_dir)
    if not meta:
        raise MissingFileError(f"{step_dir}: no meta.json; not a complete mgpt4-train checkpoint")
    if meta.get("world_size"):
        return int(meta["world_size"])
    return len([n for n in os.listdir(step_dir) if RANK_STATE_RE.match(n)])
