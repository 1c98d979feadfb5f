"""What a checkpoint holds besides the engine's own files: the engine-neutral trainable state
(`trainable_state.safetensors`), each rank's trainer state (`trainer_state_rank{R}.pt`: step, data
position, RNG states) and the RNG capture/restore, plus `read_proj_source` (`model.proj_checkpoint`).

Every checkpoint holds a trainable state, written by rank 0 from `Engine.get_full_state` whatever the engine
(DeepSpeed ZeRO 0-3 with or without offload, FSDP2), precision or world size: the fp32 master
weights of what trains (llama_proj), its AdamW moments and step, the lr schedule state and the
counters. It is the one thing consolidation, export, `model.proj_checkpoint` and a resharded resume
read (`TrainableState`); the engines' own files serve a resume on the same engine and layout.

It imports only the layout and the error base (and models/weights.py for plain weight files), so
the checkpoint protocol, export and the engines can all use it without importing one another.
"""
from __future__ import annotations

import json
import os
import random
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import numpy as np
import torch

from mgpt4_dist.checkpoint.layout import read_meta, resolve_step_dir
from mgpt4_dist.errors import CheckpointMismatchError, MissingFileError

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state besides its step counter


class FullState(NamedTuple):
    """The whole (unsharded) trainable state of an engine, in fp32 on the CPU, the same for every
    backend and layout: what `Engine.get_full_state` returns and `Engine.load_full_state` takes.

    weights: {name: tensor} of every trainable parameter (the fp32 master copy); moments:
    {"exp_avg" | "exp_avg_sq": {name: tensor}} (zeros before the first optimizer step, which is
    what AdamW starts from); adam_step: AdamW's step counter; scheduler_state: the lr schedule's
    state_dict without its config; counters: global_steps, skipped_steps, loss_scale (the fp16
    dynamic loss scale, else None) and, for DeepSpeed, global_samples.
    """
    weights: dict
    moments: dict
    adam_step: Optional[int]
    scheduler_state: Optional[dict]
    counters: dict


TRAINABLE_STATE = "trainable_state.safetensors"
TRAINABLE_STATE_FORMAT = "mgpt4_dist.trainable_state"
TRAINABLE_STATE_VERSION = 1
KINDS = ("fp32",) + MOMENTS  # the tensors of every trainable parameter, in the file as "KIND/NAME"


def write_trainable_state(state: FullState, path: str) -> None:
    """`trainable_state.safetensors`: one fp32 tensor per (kind, parameter), keyed `fp32/llama_proj.weight`,
    `exp_avg/llama_proj.weight`, `exp_avg_sq/llama_proj.weight`, ...; the file's string metadata holds
    `format` (mgpt4_dist.trainable_state), `version` (1), and as JSON `names` (parameter order),
    `adam_step`, `lr_scheduler` (the schedule's state_dict without its config) and `counters`
    (global_steps, skipped_steps, loss_scale, global_samples when DeepSpeed wrote it).
    safetensors, so reading it runs no pickle and can open one tensor at a time."""
    from safetensors.torch import save_file

    tensors = {f"fp32/{name}": t for name, t in state.weights.items()}
    for kind in MOMENTS:
        tensors.update({f"{kind}/{name}": t for name, t in state.moments[kind].items()})
    metadata = {"format": TRAINABLE_STATE_FORMAT, "version": str(TRAINABLE_STATE_VERSION),
                "names": json.dumps(list(state.weights)), "adam_step": json.dumps(state.adam_step),
                "lr_scheduler": json.dumps(state.scheduler_state), "counters": json.dumps(state.counters)}
    tmp = path + ".tmp"
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


class TrainableState:
    """The trainable state of one step folder, read from `trainable_state.safetensors` whatever engine,
    ZeRO stage or world size wrote it; the header at once, tensors when asked, one at a time."""

    def __init__(self, step_dir: str):
        from safetensors import safe_open

        self.step_dir = step_dir
        self.path = os.path.join(step_dir, TRAINABLE_STATE)
        if not os.path.isfile(self.path):
            raise CheckpointMismatchError(_missing_state_message(step_dir))
        try:
            with safe_open(self.path, framework="pt") as f:
                meta = f.metadata() or {}
                shapes = {key: torch.Size(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise CheckpointMismatchError(f"{self.path}: not a readable safetensors file ({e}); the checkpoint is "
                                        f"damaged: use an earlier step folder") from e
        if meta.get("format") != TRAINABLE_STATE_FORMAT:
            raise CheckpointMismatchError(f"{self.path}: not an mgpt4_dist trainable state (format "
                                        f"{meta.get('format')!r})")
        if int(meta.get("version", 0)) > TRAINABLE_STATE_VERSION:
            raise CheckpointMismatchError(f"{self.path}: version {meta['version']} was written by a newer mgpt4_dist; "
                                        f"this one reads up to version {TRAINABLE_STATE_VERSION}: upgrade mgpt4_dist")
        try:
            self._names: list = json.loads(meta["names"])
            self.adam_step: Optional[int] = json.loads(meta["adam_step"])
            self.lr_scheduler: Optional[dict] = json.loads(meta["lr_scheduler"])
            self._counters: dict = json.loads(meta["counters"])
        except (KeyError, ValueError) as e:
            raise CheckpointMismatchError(f"{self.path}: its metadata lacks or garbles {e}; the checkpoint is damaged") from e
        missing = [f"{kind}/{name}" for kind in KINDS for name in self._names if f"{kind}/{name}" not in shapes]
        if missing:
            raise CheckpointMismatchError(f"{self.path}: lacks {missing}; the checkpoint is damaged")
        self._shapes = {name: shapes[f"fp32/{name}"] for name in self._names}

    def names(self) -> list:
        return list(self._names)

    def shapes(self) -> Dict[str, torch.Size]:
        return dict(self._shapes)

    def counters(self) -> dict:
        return dict(self._counters)

    def iter_tensors(self, kind: str = "fp32") -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, whole fp32 tensor) of every trainable parameter; kind: fp32 (the master weights),
        exp_avg or exp_avg_sq."""
        from safetensors import safe_open

        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: choose one of {', '.join(KINDS)}")
        with safe_open(self.path, framework="pt") as f:
            for name in self._names:
                yield name, f.get_tensor(f"{kind}/{name}")

    def tensors(self, kind: str = "fp32") -> Dict[str, torch.Tensor]:
        return dict(self.iter_tensors(kind))

    def full_state(self) -> FullState:
        return FullState(self.tensors("fp32"), {kind: self.tensors(kind) for kind in MOMENTS}, self.adam_step,
                         self.lr_scheduler, self.counters())


def _missing_state_message(step_dir: str) -> str:
    meta = read_meta(step_dir)
    if not meta:
        return (f"{step_dir}: no {TRAINABLE_STATE} and no meta.json: not a step folder of an mgpt4-train run "
                f"(pass RUN_DIR, RUN_DIR/checkpoints/latest or RUN_DIR/checkpoints/step_NNNNNNNN)")
    backend = meta.get("backend", "deepspeed")
    layout = f"parallel.backend={backend}" + (f" parallel.zero_stage={meta.get('zero_stage')}"
                                              if backend == "deepspeed" else "")
    world = f" on {meta['world_size']} ranks" if meta.get("world_size") else ""
    return (f"{step_dir}: no {TRAINABLE_STATE}, the engine-neutral state that consolidation, export, "
            f"model.proj_checkpoint and a resume on another engine or world size read (an mgpt4_dist older than "
            f"that file wrote this checkpoint). Resume it once with the engine that wrote it ({layout}{world}, "
            f"checkpoint.resume={step_dir}): its next checkpoint has the file")


def read_trainable_state(path: str) -> TrainableState:
    """The trainable state of a step folder, `.../checkpoints/latest`, a checkpoints folder or a run folder."""
    return TrainableState(resolve_step_dir(path))


# --------------------------------------------------------------------------- RNG and trainer state

def rng_state() -> dict:
    """This process's Python, NumPy, torch (and CUDA) RNG states, as weights-only-loadable types."""
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


def trainer_state_file(step_dir: str, rank: int) -> str:
    return os.path.join(step_dir, f"trainer_state_rank{rank}.pt")


def load_trainer_state(step_dir: str, rank: int) -> dict:
    """One rank's `trainer_state_rank{R}.pt` (step, data position, RNG states)."""
    path = trainer_state_file(step_dir, rank)
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} is missing: the checkpoint is incomplete")
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- model.proj_checkpoint

def read_proj_source(path: str) -> dict:
    """What `model.proj_checkpoint` names, as tensors: a weight file (a MiniGPT-4 .pth, our minigpt4.pth
    or model.safetensors) or an mgpt4-consolidate folder (read by `mgpt4_dist.models.weights`), or a
    training run, its checkpoints folder or one step folder: the fp32 master weights of the step
    folder's engine-neutral trainable state, whichever engine and world size wrote it. Read here,
    above models/, so the model layer never reads a training checkpoint."""
    from mgpt4_dist.models.weights import is_weight_folder, log_weight_files, read_proj_file

    if not os.path.isdir(path) or is_weight_folder(path):
        return read_proj_file(path)
    try:
        state = read_trainable_state(path)
        log_weight_files("llama_proj (model.proj_checkpoint, training checkpoint)", state.path)
        return state.tensors("fp32")
    except (OSError, ValueError) as e:
        raise CheckpointMismatchError(f"{path}: a folder that is neither an mgpt4-consolidate output nor a "
                                      f"training checkpoint ({e})") from e


def proj_state_for(model_cfg) -> Optional[dict]:
    """The tensors of `model.proj_checkpoint` for `build_minigpt4(proj_state=...)`, or None when unset."""
    return read_proj_source(model_cfg.proj_checkpoint) if model_cfg.proj_checkpoint else None
