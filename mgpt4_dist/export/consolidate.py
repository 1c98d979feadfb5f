"""Consolidation: a training checkpoint → one fp32 artifact for inference or export.

Every step folder holds `trainable_state.safetensors`, the engine-neutral trainable state
(`mgpt4_dist.checkpoint.state.TrainableState`), whatever engine, ZeRO stage or world size wrote it: the
fp32 master weights of llama_proj are read from it, without a process group, GPU or DeepSpeed.
DeepSpeed's own files stay in the folder for a resume on the same engine and for its tools
(`zero_to_fp32.py`); nothing here parses them.

`consolidate()` writes `model.safetensors` (trained tensors, fp32, model config in its metadata),
`config.json` + `config.yaml` (what `mgpt4_dist.inference.load_model` needs) and `minigpt4.pth`
in the original `{'model': {...}}` layout; with `full=True` also every frozen tensor as sharded
safetensors with an index, streamed from the original weight files.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Dict, Iterator, List, Tuple

import torch

from mgpt4_dist.checkpoint.layout import read_meta, read_run_config, resolve_step_dir
from mgpt4_dist.checkpoint.state import TrainableState, proj_state_for
from mgpt4_dist.config import JobConfig
from mgpt4_dist.errors import CheckpointMismatchError
from mgpt4_dist.export.inference_config import inference_config, write_inference_config
from mgpt4_dist.export.proj_file import write_minigpt4_pth
from mgpt4_dist.export.shards import ShardWriter

log = logging.getLogger(__name__)


def consolidate(checkpoint: str, out_dir: str, full: bool = False, shard_bytes: int = 2 * 1024 ** 3) -> dict:
    """Write the consolidated folder; returns {'step_dir', 'tensors': {name: shape}, 'files': [...]}."""
    from safetensors.torch import save_file

    step_dir = resolve_step_dir(checkpoint)
    cfg = read_run_config(step_dir)
    saved = TrainableState(step_dir)
    meta = read_meta(step_dir)
    os.makedirs(out_dir, exist_ok=True)
    model_meta = {"format": "pt", "mgpt4_config": json.dumps(inference_config(cfg, meta.get("step"), step_dir, full))}

    # The trained part is small next to a shard: written from one dict.
    trained = saved.tensors("fp32")
    files = []
    if full:
        files += _write_full(cfg, trained, out_dir, shard_bytes, model_meta)
    else:
        save_file(trained, os.path.join(out_dir, "model.safetensors"), metadata=model_meta)
        files.append("model.safetensors")
    write_minigpt4_pth(trained, os.path.join(out_dir, "minigpt4.pth"))
    files.append("minigpt4.pth")
    files += write_inference_config(cfg, out_dir, meta.get("step"), step_dir, full)
    return {"step_dir": step_dir, "tensors": {k: list(v.shape) for k, v in trained.items()}, "files": files}


def _frozen_tensor_sources(cfg: JobConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every frozen tensor under its MiniGPT4 state-dict name, one source at a time."""
    from safetensors import safe_open

    from mgpt4_dist.models.minigpt4 import build_vision_towers

    vit, qformer, ln_vision = build_vision_towers(cfg.model, seed=cfg.train.seed,
                                                  proj_source=proj_state_for(cfg.model))
    for prefix, module in (("visual_encoder.", vit), ("qformer.", qformer), ("ln_vision.", ln_vision)):
        if module is not None:
            for k, v in module.state_dict().items():
                yield prefix + k, v
    del vit, qformer, ln_vision
    llm_files = sorted(glob.glob(os.path.join(cfg.model.llm_path, "*.safetensors")))
    if not llm_files:
        raise CheckpointMismatchError(f"--full streams the LLM from safetensors files; {cfg.model.llm_path} has none")
    for path in llm_files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                yield "llm." + key, f.get_tensor(key)


def _write_full(cfg: JobConfig, trained: Dict[str, torch.Tensor], out_dir: str, shard_bytes: int,
                metadata: dict) -> List[str]:
    writer = ShardWriter(out_dir, shard_bytes, metadata=metadata, index_metadata=metadata, single_file=False)
    writer.add_together(trained)  # the trained tensors lead the first shard, whatever its size
    for key, tensor in _frozen_tensor_sources(cfg):
        writer.add(key, tensor)
    files = writer.finish()
    # The tokenizer and LLM config travel with the weights so the folder stands alone.
    llm_dir = os.path.join(out_dir, "llm")
    os.makedirs(llm_dir, exist_ok=True)
    for name in os.listdir(cfg.model.llm_path):
        if not name.endswith((".safetensors", ".bin", ".pth")) and os.path.isfile(os.path.join(cfg.model.llm_path, name)):
            shutil.copyfile(os.path.join(cfg.model.llm_path, name), os.path.join(llm_dir, name))
    return files + ["llm/"]
