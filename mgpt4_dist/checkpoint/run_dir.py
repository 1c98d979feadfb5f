"""What a run may do with its run dir before it writes anything, and what changed since the
checkpoint it resumes from.

- `check_run_dir`: a new run (nothing to resume) in a folder that holds another run's
  checkpoints or metrics is refused, unless `checkpoint.resume=never run.overwrite=true`, which
  clears what a run writes there first (never anything else: a Slurm job log stays).
- `resume_changes`: the config against the checkpoint's own `config.yaml`. Every change is printed;
  changes that make the continuation differ from an uninterrupted run (batch layout, world size,
  precision, data) are refused unless `checkpoint.allow_changes=true`. Backend, ZeRO stage and
  other engine choices only notice: resharded resume restores them exactly.
- `finished_at`: the checkpoint's step when it is already at or past the last step to run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, List, Optional, Tuple

import yaml

from mgpt4_dist.checkpoint.layout import (ResumePoint, checkpoints_dir, list_checkpoints, read_step_config,
                                         saved_world_size, tag_step)
from mgpt4_dist.config import ConfigError, JobConfig, config_from_dict, to_dict
from mgpt4_dist.errors import UserError

log = logging.getLogger(__name__)

# What mgpt4-train writes into RUN_DIR, and so what run.overwrite=true removes.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "samples.jsonl", "tb", "config.yaml", "ds_config.json", "profile")

# Keys whose change makes the resumed run differ from an uninterrupted one (batches, numerics, data).
EXACT_RESUME_KEYS = ("train.micro_batch_size", "train.precision", "train.seed", "model.vit_precision",
                     "data.shards", "data.resample", "data.num_workers", "data.features", "data.group_by_length",
                     "data.max_txt_len", "data.end_sym", "data.prompt_template", "data.prompts", "data.prompt_path",
                     "data.clean_captions", "data.max_caption_words")
# Keys expected to differ between the parts of one run (job chains, copied run dirs, the opt-ins).
IGNORED_KEYS = ("run_dir", "run.overwrite", "checkpoint.resume", "checkpoint.allow_changes", "train.stop_at_step",
                "train.grad_accum_steps", "train.global_batch_size")  # the last two: compared as resolved accumulation


class RunDirError(UserError):
    """A run dir or resume that would silently mix two runs."""


def _metric_steps(run_dir: str) -> List[int]:
    steps = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    steps.append(int(json.loads(line)["step"]))
                except (ValueError, KeyError, TypeError):
                    continue
    except OSError:
        pass
    return steps


def previous_run(run_dir: str) -> Optional[str]:
    """What an earlier run left in `run_dir` (checkpoints, logged steps), or None."""
    tags, steps = list_checkpoints(checkpoints_dir(run_dir)), _metric_steps(run_dir)
    found = []
    if tags:
        found.append(f"checkpoints {', '.join(tags[-3:])}")
    if steps:
        found.append(f"metrics.jsonl with steps {min(steps)}-{max(steps)}")
    return " and ".join(found) or None


def prepare(cfg: JobConfig, point: Optional[ResumePoint], rank: int, world: int, accum: int) -> Optional[str]:
    """All checks before a run writes to its run dir (every rank calls it). `point` is the
    checkpoint to resume from, or None. Returns "finished" when there is nothing to do (said on
    rank 0), else None; raises RunDirError for a refusal."""
    check_run_dir(cfg, point is not None, rank)
    if point is None:
        return None
    done = finished_at(point.tag, cfg)
    if done:
        if rank == 0:
            print(done, flush=True)
        return "finished"
    check_resume_changes(cfg, point.path, saved_world_size(point.path), world, accum)
    return None


def check_run_dir(cfg: JobConfig, resuming: bool, rank: int) -> None:
    """Call before anything is written to cfg.run_dir (all ranks; rank 0 clears)."""
    if resuming:
        return
    found = previous_run(cfg.run_dir)
    if found is None:
        return
    if not list_checkpoints(checkpoints_dir(cfg.run_dir)) and cfg.checkpoint.resume == "auto" and _same_run(cfg):
        # An earlier attempt of this very run (same config) stopped before its first checkpoint, e.g. a
        # rank crashed and the job restarted itself: start it again; its metrics are dropped on open.
        log.info("run_dir=%s: an earlier attempt of this run stopped before its first checkpoint (%s): "
                 "starting again from step 0", cfg.run_dir, found)
        return
    if not cfg.run.overwrite:
        why = ("checkpoint.resume=never would start a second run over it" if cfg.checkpoint.resume == "never"
               else f"there is no checkpoint to continue from (checkpoint.resume={cfg.checkpoint.resume})")
        raise RunDirError(f"run_dir={cfg.run_dir} holds another run ({found}) and {why}: choose a new run_dir, "
                          f"or add checkpoint.resume=never run.overwrite=true to delete it and start over")
    if rank == 0:
        for name in RUN_OUTPUTS:
            path = os.path.join(cfg.run_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        log.info("run.overwrite=true: deleted the earlier run in %s (%s)", cfg.run_dir, found)


def _same_run(cfg: JobConfig) -> bool:
    """RUN_DIR/config.yaml (written when a run starts) is this config, but for the keys that may differ
    between the parts of one run."""
    path = os.path.join(cfg.run_dir, "config.yaml")
    try:
        with open(path) as f:
            before = _flatten(yaml.safe_load(f) or {})
    except (OSError, yaml.YAMLError):
        return False
    after = _flatten(to_dict(cfg))
    return all(before.get(key) == value for key, value in after.items() if key not in IGNORED_KEYS)


def finished_at(point_tag: str, cfg: JobConfig) -> Optional[str]:
    """'already at step S of N: nothing to do' when the checkpoint is at or past the last step."""
    step = tag_step(point_tag)
    last = min(cfg.train.stop_at_step or cfg.train.max_steps, cfg.train.max_steps)
    if step < last:
        return None
    why = f" (train.stop_at_step={cfg.train.stop_at_step})" if last < cfg.train.max_steps else ""
    return f"already at step {step} of {cfg.train.max_steps}{why}: nothing to do"


def _flatten(tree: Any, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) or value == "" else str(value)


def config_changes(old: dict, new: JobConfig, old_layout: Tuple[int, int], new_layout: Tuple[int, int]
                   ) -> Tuple[List[str], List[str]]:
    """(changes that break exact resume, other changes), each 'key old -> new'. `old` is the
    checkpoint's config.yaml as read; layouts are (world size, accumulation). Keys the checkpoint's
    config lacks (written before they existed) are not changes."""
    before, after = _flatten(old), _flatten(to_dict(new))
    breaking, other = [], []
    for key, value in after.items():
        if key not in before or key in IGNORED_KEYS or before[key] == value:
            continue
        line = f"{key} {_show(before[key])} -> {_show(value)}"
        (breaking if key in EXACT_RESUME_KEYS else other).append(line)
    (old_world, old_accum), (world, accum) = old_layout, new_layout
    if old_accum != accum:
        breaking.append(f"gradient accumulation {old_accum} -> {accum}")
    if old_world != world:
        breaking.append(f"world size {old_world} -> {world} (the data streams are renumbered, so the data order "
                        f"differs from an uninterrupted run)")
    return breaking, other


def check_resume_changes(cfg: JobConfig, step_dir: str, old_world: int, world: int, accum: int) -> None:
    """Print what changed against the checkpoint's config; refuse what breaks exact resume unless
    checkpoint.allow_changes=true."""
    old = read_step_config(step_dir, required=False)
    if not old:
        log.warning("%s has no config.yaml: cannot tell what changed since that checkpoint", step_dir)
        return
    try:
        old_cfg = config_from_dict(old)
        old_accum = (old_cfg.train.global_batch_size // (old_cfg.train.micro_batch_size * old_world)
                     if old_cfg.train.global_batch_size else old_cfg.train.grad_accum_steps)
    except (ConfigError, ZeroDivisionError):  # written by another version: compare what both know
        old_accum = accum
    breaking, other = config_changes(old, cfg, (old_world, old_accum), (world, accum))
    if other:
        log.info("changed since %s/config.yaml: %s", step_dir, "; ".join(other))
    if not breaking:
        return
    if cfg.checkpoint.allow_changes:
        log.warning("resuming with changes that break exact resume (checkpoint.allow_changes=true): %s",
                    "; ".join(breaking))
        return
    raise RunDirError(f"resuming from {step_dir} with changes that break exact resume: {'; '.join(breaking)}. "
                      f"Undo them, or set checkpoint.allow_changes=true to continue anyway")
