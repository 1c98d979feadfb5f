"""The inference config written beside every export, and what makes a folder a consolidated one
(`is_consolidated`). A step folder's own config.yaml is read by `mgpt4_dist.checkpoint.layout`.

`config.json` (and the `mgpt4_config` metadata of exported safetensors files) holds what
`mgpt4_dist.inference.load_model` needs: the model config, the conversation style, the text
settings of the data config, and where the weights came from.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

from mgpt4_dist.config import JobConfig, save_config, to_dict

INFERENCE_FORMAT = "mgpt4_dist.consolidated"
INFERENCE_VERSION = 1


def is_consolidated(path: str) -> bool:
    """A folder written by `mgpt4-consolidate`: its config.json names INFERENCE_FORMAT, beside config.yaml."""
    conf = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(conf) and os.path.isfile(os.path.join(path, "config.yaml"))):
        return False
    try:
        with open(conf) as f:
            return json.load(f).get("format") == INFERENCE_FORMAT
    except (OSError, ValueError):
        return False


def conversation_style(cfg: JobConfig) -> str:
    """vicuna0 (`###Human:` turns) or llama2 (`[INST]`): the Llama-2 variant has no Q-Former."""
    return "llama2" if not cfg.model.has_qformer else "vicuna0"


def inference_config(cfg: JobConfig, step: Optional[int], source: str, full: bool) -> dict:
    return {"format": INFERENCE_FORMAT, "version": INFERENCE_VERSION, "step": step, "source": source,
            "conversation": conversation_style(cfg), "full": full,
            "model": to_dict(cfg.model),
            "data": {"max_txt_len": cfg.data.max_txt_len, "end_sym": cfg.data.end_sym,
                     "prompt_template": cfg.data.prompt_template}}


def write_inference_config(cfg: JobConfig, out_dir: str, step: Optional[int], source: str, full: bool) -> List[str]:
    """`config.json` (the inference config) and `config.yaml` (the whole run config) into `out_dir`."""
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(inference_config(cfg, step, source, full), f, indent=2)
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    return ["config.json", "config.yaml"]
