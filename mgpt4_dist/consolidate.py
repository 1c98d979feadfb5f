"""Consolidation: a sharded training checkpoint → one fp32 artifact for inference or export.

Two readers with one interface (`names()`, `shapes()`, `iter_tensors(kind)` / `tensors(kind)` for
kind in "fp32", "exp_avg", "exp_avg_sq", `optimizer_step()`, `lr_scheduler`, `counters()`), both
working without a process group or GPU, one tensor at a time; `read_checkpoint` picks the one for
the backend recorded in the step folder's meta.json:

- `DeepSpeedCheckpoint` (ZeRO 0-3, any world size): the optimizer shards are opened with
  `mmap=True`, so only the pages of the tensor being assembled are read; each parameter is cut
  out of the flat fp32 partitions of every rank (the layouts DeepSpeed's `zero_to_fp32`
  reconstructs), written, and dropped. Peak RAM is about the largest tensor plus the shard pages
  in flight, not the whole model;
- `FSDPCheckpoint` (FSDP2, any world size): `torch.distributed.checkpoint` metadata gives every
  tensor's name and global shape; each is loaded alone (`dcp.load(..., no_dist=True)` of a
  one-entry state dict), which reads only that tensor's chunks from every rank's file.

The Adam moments and counters they also give are what resuming on another backend, world size
or ZeRO stage uses (`mgpt4_dist.checkpoint.load_checkpoint`).

`consolidate()` writes `model.safetensors` (trained tensors, fp32, model config in its metadata),
`config.json` + `config.yaml` (what `mgpt4_dist.inference.load_model` needs) and `minigpt4.pth`
in the original `{'model': {...}}` layout; with `full=True` also every frozen tensor as sharded
safetensors with an index, streamed from the original weight files.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from mgpt4_dist.checkpoint import TAG_RE
from mgpt4_dist.config import JobConfig, config_from_dict, save_config, to_dict
from mgpt4_dist.errors import UserError

log = logging.getLogger(__name__)

MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointFormatError(UserError, ValueError):
    """A folder that is not a readable training checkpoint."""


def resolve_step_dir(path: str) -> str:
    """A step folder, `.../checkpoints/latest`, a checkpoints folder or a run folder → the step folder."""
    path = os.path.abspath(path)
    if os.path.basename(path) == "latest":
        root = os.path.dirname(path)
        if os.path.isdir(path):  # a folder named latest: take it as is
            return path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no `latest` pointer there")
        with open(path) as f:
            return os.path.join(root, f.read().strip())
    for root in (path, os.path.join(path, "checkpoints")):
        latest = os.path.join(root, "latest")
        if os.path.isfile(latest) and not TAG_RE.match(os.path.basename(path)):
            with open(latest) as f:
                return os.path.join(root, f.read().strip())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    return path


def _ds_checkpoint_globals() -> list:
    """The few non-tensor objects DeepSpeed (and our lr schedule) pickle into its checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from mgpt4_dist.config import OptimConfig

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, OptimConfig]


def _load_ds_file(path: str, mmap: bool) -> dict:
    """A DeepSpeed checkpoint file, unpickled with weights_only=True and an allowlist of the classes
    DeepSpeed stores: a checkpoint folder handed to mgpt4-consolidate or checkpoint.resume may come
    from anywhere, and an arbitrary pickle could run code."""
    import pickle

    try:
        with torch.serialization.safe_globals(_ds_checkpoint_globals()):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointFormatError(
            f"{path}: holds pickled objects outside the DeepSpeed allowlist, refused without running them "
            f"({str(e).splitlines()[-1] if str(e) else e}). If this is a DeepSpeed checkpoint you trust, the "
            f"class named there belongs in consolidate._ds_checkpoint_globals") from e


class DeepSpeedCheckpoint:
    """Per-parameter access to the fp32 master weights and Adam moments of a DeepSpeed checkpoint."""

    def __init__(self, step_dir: str):
        self.step_dir = step_dir
        model_files = sorted(glob.glob(os.path.join(step_dir, "*mp_rank_00_model_states.pt")))
        if not model_files:
            raise CheckpointFormatError(f"{step_dir}: no DeepSpeed *_model_states.pt file; is this a step folder "
                                        f"of an mgpt4-train run with parallel.backend=deepspeed?")
        model_state = _load_ds_file(model_files[0], mmap=True)
        self.param_shapes: List["OrderedDict[str, torch.Size]"] = model_state["param_shapes"]
        self.module_state = model_state["module"]
        self.lr_scheduler = _schedule_state(model_state.get("lr_scheduler"))
        self._model_counters = {k: int(model_state.get(k) or 0)
                                for k in ("global_steps", "global_samples", "skipped_steps")}
        self.optim_files = sorted(glob.glob(os.path.join(step_dir, "*optim_states.pt")),
                                  key=lambda p: int(p.split("zero_pp_rank_")[1].split("_")[0])
                                  if "zero_pp_rank_" in p else 0)
        self._optim: Optional[List[dict]] = None
        self.zero_stage = 0
        self.world_size = int(model_state.get("dp_world_size", 1))
        if self.optim_files:
            first = self.optim_states()[0]
            self.zero_stage = int(first.get("zero_stage", 0))
            count = first.get("partition_count", len(self.optim_files))
            self.world_size = max(count) if isinstance(count, list) else int(count)
            if self.zero_stage >= 1 and self.world_size != len(self.optim_files):
                raise CheckpointFormatError(
                    f"{step_dir}: expected {self.world_size} *_optim_states.pt files (one per rank), found "
                    f"{len(self.optim_files)}: the checkpoint is incomplete")

    def optim_states(self) -> List[dict]:
        if self._optim is None:
            self._optim = [_load_ds_file(p, mmap=True)["optimizer_state_dict"] for p in self.optim_files]
        return self._optim

    def names(self) -> List[str]:
        return [name for group in self.param_shapes for name in group]

    def shapes(self) -> Dict[str, torch.Size]:
        return {name: shape for group in self.param_shapes for name, shape in group.items()}

    # ------------------------------------------------------------------ flat partitions
    def _flat(self, kind: str) -> List[List[torch.Tensor]]:
        """[rank][group] flat fp32 partitions of `kind` (fp32 master weights or an Adam moment)."""
        out = []
        for sd in self.optim_states():
            if kind == "fp32":
                out.append(list(sd["single_partition_of_fp32_groups"] if self.zero_stage <= 2
                                else sd["fp32_flat_groups"]))
                continue
            base = sd["base_optimizer_state"] if self.zero_stage <= 2 else sd["optimizer_state_dict"]
            if not isinstance(base, dict) or "state" not in base:
                raise CheckpointFormatError(f"{self.step_dir}: optimizer state in an unsupported layout "
                                            f"(elastic or offloaded); cannot read {kind}")
            state = base["state"]
            out.append([state[g][kind] for g in sorted(state)])
        return out

    def iter_tensors(self, kind: str = "fp32") -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, full fp32 tensor) for every trainable parameter, one at a time."""
        if not self.optim_files:  # no ZeRO optimizer files: the module states hold the weights
            if kind != "fp32":
                raise CheckpointFormatError(
                    f"{self.step_dir}: a ZeRO-0 checkpoint has no optimizer shards, so no {kind} to reshard; resume "
                    f"it with parallel.backend=deepspeed parallel.zero_stage=0 on the same number of ranks")
            for name in self.names():
                yield name, self.module_state[name].float().clone()
            return
        flat = self._flat(kind)
        if self.zero_stage <= 2:
            yield from self._iter_zero2(flat, kind)
        else:
            yield from self._iter_zero3(flat)

    def _iter_zero2(self, flat, kind) -> Iterator[Tuple[str, torch.Tensor]]:
        # Each group is one flat vector split into equal consecutive partitions, one per rank;
        # parameters sit in it in order, each followed by its alignment padding.
        paddings = self.optim_states()[0].get("param_alignment_paddings")
        for g, shapes in enumerate(self.param_shapes):
            parts = [ranks[g] for ranks in flat]
            bounds = [0]
            for p in parts:
                bounds.append(bounds[-1] + p.numel())
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                pieces = []
                for r, p in enumerate(parts):
                    lo, hi = max(offset, bounds[r]), min(offset + numel, bounds[r + 1])
                    if lo < hi:
                        pieces.append(p[lo - bounds[r]:hi - bounds[r]])
                if sum(x.numel() for x in pieces) != numel:
                    raise CheckpointFormatError(f"{self.step_dir}: {name} ({kind}) does not fit the saved partitions")
                yield name, _join(pieces).view(shape)
                offset += numel + (paddings[g][i] if paddings else 0)

    def _iter_zero3(self, flat) -> Iterator[Tuple[str, torch.Tensor]]:
        # Every parameter is split into ceil(numel / world) pieces, one per rank, at the same
        # offset of each rank's concatenated flat groups.
        world = len(flat)
        group_sizes = [g.numel() for g in flat[0]]
        starts = [0]
        for n in group_sizes:
            starts.append(starts[-1] + n)

        def cut(rank: int, lo: int, hi: int) -> List[torch.Tensor]:
            pieces = []
            for g, groups_start in enumerate(starts[:-1]):
                a, b = max(lo, groups_start), min(hi, starts[g + 1])
                if a < b:
                    pieces.append(flat[rank][g][a - groups_start:b - groups_start])
            return pieces

        offset = 0
        for name, shape in self.shapes().items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            full = _join([x for r in range(world) for x in cut(r, offset, offset + part)], numel)
            yield name, full.view(shape)
            offset += part

    def tensors(self, kind: str = "fp32") -> Dict[str, torch.Tensor]:
        return dict(self.iter_tensors(kind))

    def optimizer_step(self) -> Optional[int]:
        """Adam's step counter (the same for every parameter here)."""
        if not self.optim_files:
            return None
        sd = self.optim_states()[0]
        base = sd["base_optimizer_state"] if self.zero_stage <= 2 else sd["optimizer_state_dict"]
        if isinstance(base, dict) and base.get("state"):
            step = next(iter(base["state"].values())).get("step")
            return int(step.item() if torch.is_tensor(step) else step)
        return None

    def counters(self) -> dict:
        """global_steps, global_samples, skipped_steps and the fp16 dynamic loss scale (None otherwise)."""
        loss_scale = None
        if self.optim_files:
            sd = self.optim_states()[0]
            scaler = sd.get("loss_scaler")
            if sd.get("dynamic_loss_scale") and scaler is not None:
                loss_scale = float(scaler.cur_scale)
        return {**self._model_counters, "loss_scale": loss_scale}


def _schedule_state(state: Optional[dict]) -> Optional[dict]:
    # The schedule's own config object stays behind: the resuming run's optim config rebuilt it.
    return None if state is None else {k: v for k, v in state.items() if k != "cfg"}


class FSDPCheckpoint:
    """Per-parameter access to an FSDP2 checkpoint: `torch.distributed.checkpoint` files holding
    {"model": llama_proj, "optim": AdamW state keyed by parameter name} plus `engine_state.pt`."""

    def __init__(self, step_dir: str):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.step_dir = step_dir
        if not os.path.isfile(os.path.join(step_dir, ".metadata")):
            raise CheckpointFormatError(f"{step_dir}: no torch.distributed.checkpoint .metadata file; is this a step "
                                        f"folder of an mgpt4-train run with parallel.backend=fsdp?")
        meta = FileSystemReader(step_dir).read_metadata().state_dict_metadata
        self._entries = {k: v for k, v in meta.items() if isinstance(v, TensorStorageMetadata)}
        self._shapes = {k[len("model."):]: torch.Size(v.size) for k, v in self._entries.items()
                        if k.startswith("model.")}
        if not self._shapes:
            raise CheckpointFormatError(f"{step_dir}: the checkpoint holds no model tensors")
        engine_state = os.path.join(step_dir, "engine_state.pt")
        if not os.path.isfile(engine_state):
            raise CheckpointFormatError(f"{step_dir}: engine_state.pt is missing: the checkpoint is incomplete")
        self._engine_state = torch.load(engine_state, map_location="cpu", weights_only=True)
        self.lr_scheduler = _schedule_state(self._engine_state.get("scheduler"))

    def names(self) -> List[str]:
        return list(self._shapes)

    def shapes(self) -> Dict[str, torch.Size]:
        return dict(self._shapes)

    def _key(self, name: str, kind: str) -> str:
        return f"model.{name}" if kind == "fp32" else f"optim.state.{name}.{kind}"

    def _load(self, key: str) -> torch.Tensor:
        import warnings

        import torch.distributed.checkpoint as dcp

        if key not in self._entries:
            raise CheckpointFormatError(f"{self.step_dir}: no {key} in the checkpoint")
        entry = self._entries[key]
        state = {key: torch.empty(entry.size, dtype=entry.properties.dtype)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=self.step_dir, no_dist=True)
        return state[key]

    def iter_tensors(self, kind: str = "fp32") -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, full fp32 tensor) for every trainable parameter, one at a time."""
        if kind not in ("fp32",) + MOMENTS:
            raise ValueError(f"kind={kind!r}: choose fp32, exp_avg or exp_avg_sq")
        for name in self._shapes:
            yield name, self._load(self._key(name, kind)).float()

    def tensors(self, kind: str = "fp32") -> Dict[str, torch.Tensor]:
        return dict(self.iter_tensors(kind))

    def optimizer_step(self) -> Optional[int]:
        key = self._key(self.names()[0], "step")
        return int(self._load(key).item()) if key in self._entries else None

    def counters(self) -> dict:
        scaler = self._engine_state.get("scaler")
        return {"global_steps": int(self._engine_state.get("global_steps", 0)),
                "skipped_steps": int(self._engine_state.get("skipped_steps", 0)),
                "loss_scale": float(scaler["scale"]) if scaler else None}


def _join(pieces: List[torch.Tensor], numel: Optional[int] = None) -> torch.Tensor:
    """One fp32 copy of the pieces (views into memory-mapped shards), cut to numel: the only copy made."""
    numel = sum(p.numel() for p in pieces) if numel is None else numel
    out = torch.empty(numel, dtype=torch.float32)
    at = 0
    for p in pieces:
        take = min(p.numel(), numel - at)
        if take <= 0:
            break
        out[at:at + take].copy_(p.detach()[:take])  # fp32 partitions are saved with requires_grad
        at += take
    return out


READERS = {"deepspeed": DeepSpeedCheckpoint, "fsdp": FSDPCheckpoint}


def read_checkpoint(step_dir: str):
    """The reader for the backend that wrote `step_dir` (meta.json's backend; DeepSpeed when absent)."""
    backend = read_meta(step_dir).get("backend", "deepspeed")
    if backend not in READERS:
        raise CheckpointFormatError(f"{step_dir}: meta.json names parallel.backend={backend!r}, which no reader "
                                    f"handles ({', '.join(READERS)}); was it written by another mgpt4_dist version?")
    return READERS[backend](step_dir)


def read_meta(step_dir: str) -> dict:
    path = os.path.join(step_dir, "meta.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_run_config(step_dir: str) -> JobConfig:
    import yaml

    path = os.path.join(step_dir, "config.yaml")
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{step_dir}: no config.yaml (not a complete mgpt4-train checkpoint)")
    with open(path) as f:
        return config_from_dict(yaml.safe_load(f))


# --------------------------------------------------------------------------- writing

def conversation_style(cfg: JobConfig) -> str:
    """vicuna0 (`###Human:` turns) or llama2 (`[INST]`): the Llama-2 variant has no Q-Former."""
    return "llama2" if not cfg.model.has_qformer else "vicuna0"


def inference_config(cfg: JobConfig, step: Optional[int], source: str, full: bool) -> dict:
    return {"format": "mgpt4_dist.consolidated", "version": 1, "step": step, "source": source,
            "conversation": conversation_style(cfg), "full": full,
            "model": to_dict(cfg.model),
            "data": {"max_txt_len": cfg.data.max_txt_len, "end_sym": cfg.data.end_sym,
                     "prompt_template": cfg.data.prompt_template}}


def write_minigpt4_pth(tensors: Dict[str, torch.Tensor], path: str) -> None:
    """The original demo.py's `ckpt` file: `{'model': {'llama_proj.weight', 'llama_proj.bias'}}`, fp32."""
    tmp = path + ".tmp"
    torch.save({"model": {k: v.float().contiguous() for k, v in tensors.items()}}, tmp)
    os.replace(tmp, path)


def consolidate(checkpoint: str, out_dir: str, full: bool = False, shard_bytes: int = 2 * 1024 ** 3) -> dict:
    """Write the consolidated folder; returns {'step_dir', 'tensors': {name: shape}, 'files': [...]}."""
    from safetensors.torch import save_file

    step_dir = resolve_step_dir(checkpoint)
    cfg = read_run_config(step_dir)
    reader = read_checkpoint(step_dir)
    meta = read_meta(step_dir)
    os.makedirs(out_dir, exist_ok=True)
    model_meta = {"format": "pt", "mgpt4_config": json.dumps(inference_config(cfg, meta.get("step"), step_dir, full))}

    # The trained part is small next to a shard: written from one dict, filled tensor by tensor.
    trained: Dict[str, torch.Tensor] = {}
    for name, tensor in reader.iter_tensors("fp32"):
        trained[name] = tensor
    files = []
    if full:
        files += _write_full(cfg, trained, out_dir, shard_bytes, model_meta)
    else:
        save_file(trained, os.path.join(out_dir, "model.safetensors"), metadata=model_meta)
        files.append("model.safetensors")
    write_minigpt4_pth(trained, os.path.join(out_dir, "minigpt4.pth"))
    files.append("minigpt4.pth")
    conf = inference_config(cfg, meta.get("step"), step_dir, full)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    files += ["config.json", "config.yaml"]
    return {"step_dir": step_dir, "tensors": {k: list(v.shape) for k, v in trained.items()}, "files": files}


def _frozen_tensor_sources(cfg: JobConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every frozen tensor under its MiniGPT4 state-dict name, one source at a time."""
    from safetensors import safe_open

    from mgpt4_dist.models.minigpt4 import build_vision_towers

    vit, qformer, ln_vision = build_vision_towers(cfg.model, seed=cfg.train.seed)
    for prefix, module in (("visual_encoder.", vit), ("qformer.", qformer), ("ln_vision.", ln_vision)):
        if module is not None:
            for k, v in module.state_dict().items():
                yield prefix + k, v
    del vit, qformer, ln_vision
    llm_files = sorted(glob.glob(os.path.join(cfg.model.llm_path, "*.safetensors")))
    if not llm_files:
        raise CheckpointFormatError(f"--full streams the LLM from safetensors files; {cfg.model.llm_path} has none")
    for path in llm_files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                yield "llm." + key, f.get_tensor(key)


def _write_full(cfg: JobConfig, trained: Dict[str, torch.Tensor], out_dir: str, shard_bytes: int,
                metadata: dict) -> List[str]:
    from safetensors.torch import save_file

    shards: List[Dict[str, torch.Tensor]] = [dict(trained)]
    sizes = [sum(t.numel() * t.element_size() for t in trained.values())]
    names: List[List[str]] = [list(trained)]
    tmp_files = []

    def flush(i):
        name = f".shard-{i:05d}.safetensors"
        save_file(shards[i], os.path.join(out_dir, name), metadata=metadata)
        tmp_files.append(name)
        shards[i] = {}

    for key, tensor in _frozen_tensor_sources(cfg):
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] + nbytes > shard_bytes and sizes[-1] > 0:
            flush(len(shards) - 1)
            shards.append({})
            sizes.append(0)
            names.append([])
        shards[-1][key] = tensor.contiguous()
        sizes[-1] += nbytes
        names[-1].append(key)
    flush(len(shards) - 1)
    total = len(tmp_files)
    weight_map, files = {}, []
    for i, tmp in enumerate(tmp_files):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
        files.append(final)
        for key in names[i]:
            weight_map[key] = final
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes), **metadata}, "weight_map": weight_map}, f, indent=1)
    # The tokenizer and LLM config travel with the weights so the folder stands alone.
    llm_dir = os.path.join(out_dir, "llm")
    os.makedirs(llm_dir, exist_ok=True)
    for name in os.listdir(cfg.model.llm_path):
        if not name.endswith((".safetensors", ".bin", ".pth")) and os.path.isfile(os.path.join(cfg.model.llm_path, name)):
            shutil.copyfile(os.path.join(cfg.model.llm_path, name), os.path.join(llm_dir, name))
    return files + ["model.safetensors.index.json", "llm/"]
