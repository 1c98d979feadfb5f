"""The trained projection (llama_proj) of a checkpoint as one file (`mgpt4-export`).

`minigpt4`: `{'model': {'llama_proj.weight', 'llama_proj.bias'}}`, fp32: the original `demo.py`'s
`ckpt` (what `eval_configs/*.yaml ckpt:` loads). `safetensors`: the same tensors with the
inference config (JSON) in the file's metadata under `mgpt4_config`. Both load back through
`model.proj_checkpoint`.
"""
from __future__ import annotations

import json
import os
from typing import Dict

import torch

from mgpt4_dist.checkpoint.layout import read_meta, read_run_config, resolve_step_dir
from mgpt4_dist.checkpoint.state import TrainableState
from mgpt4_dist.errors import InvalidInputError
from mgpt4_dist.export.inference_config import inference_config

FORMATS = ("minigpt4", "safetensors")
DEFAULT_NAMES = {"minigpt4": "pretrained_minigpt4.pth", "safetensors": "llama_proj.safetensors"}


def write_minigpt4_pth(tensors: Dict[str, torch.Tensor], path: str) -> None:
    """The original demo.py's `ckpt` file: `{'model': {'llama_proj.weight', 'llama_proj.bias'}}`, fp32."""
    tmp = path + ".tmp"
    torch.save({"model": {k: v.float().contiguous() for k, v in tensors.items()}}, tmp)
    os.replace(tmp, path)


def export_proj_file(checkpoint: str, fmt: str, out: str) -> dict:
    """Write the projection of `checkpoint` (a run, `latest` or step folder) to the file `out` in
    `fmt`; returns {'step_dir', 'tensors': {name: shape}}."""
    from safetensors.torch import save_file

    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        raise InvalidInputError(f"--out {out}: a folder; --out takes the file to write, "
                                f"e.g. --out {os.path.join(out, DEFAULT_NAMES[fmt])}")
    step_dir = resolve_step_dir(checkpoint)
    cfg = read_run_config(step_dir)
    tensors = TrainableState(step_dir).tensors("fp32")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"--out {out}: cannot create its folder ({e.strerror})") from None
    if fmt == "minigpt4":
        write_minigpt4_pth(tensors, out)
    else:
        meta = {"format": "pt", "mgpt4_config": json.dumps(inference_config(cfg, read_meta(step_dir).get("step"),
                                                                             step_dir, False))}
        tmp = out + ".tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, out)
    return {"step_dir": step_dir, "tensors": {k: list(v.shape) for k, v in tensors.items()}}
