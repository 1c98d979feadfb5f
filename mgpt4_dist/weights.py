"""Weight-file tools: building Vicuna v0 working weights from LLaMA + a delta, tensor by tensor.

The original README builds Vicuna v0 with FastChat's `apply_delta`: every tensor is base + delta,
and the config and tokenizer come from the delta. Here one delta shard and the base tensors it
needs are in memory at a time, so a 13B model needs about one shard of RAM, not both models.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Dict, Iterator, List, Tuple

import torch

from mgpt4_dist.errors import InvalidInputError, MissingFileError

SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.json", "added_tokens.json")


def weight_shards(folder: str, what: str = "model folder") -> Tuple[List[str], Dict[str, str]]:
    """(shard files in order, tensor name → shard file) of a Hugging Face model folder."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            return [os.path.join(folder, f) for f in files], {k: os.path.join(folder, v) for k, v in weight_map.items()}
    for single in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(folder, single)
        if os.path.isfile(path):
            return [path], {name: path for name in shard_tensor_names(path)}
    if not os.path.isdir(folder):
        raise MissingFileError(f"{what} {folder}: no such folder")
    raise MissingFileError(f"{what} {folder}: no model.safetensors, pytorch_model.bin or their index files; "
                           f"expected a Hugging Face model folder")


def shard_tensor_names(path: str) -> List[str]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys())


class ShardReader:
    """Reads tensors by name, keeping at most one shard open (safetensors lazily, .bin memory-mapped)."""

    def __init__(self, weight_map: Dict[str, str]):
        self.weight_map = weight_map
        self._path, self._handle = None, None

    def get(self, name: str) -> torch.Tensor:
        path = self.weight_map[name]
        if path != self._path:
            self._path = path
            if path.endswith(".safetensors"):
                from safetensors import safe_open

                self._handle = safe_open(path, framework="pt")
            else:
                self._handle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if path.endswith(".safetensors"):
            return self._handle.get_tensor(name)
        return self._handle[name]


def _read_shard(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def apply_delta(base_dir: str, delta_dir: str, out_dir: str, progress: bool = True) -> dict:
    from safetensors.torch import save_file
    from tqdm import tqdm

    base_files, base_map = weight_shards(base_dir, "--base")
    delta_files, delta_map = weight_shards(delta_dir, "--delta")
    missing = sorted(set(delta_map) - set(base_map))
    if missing:
        raise InvalidInputError(f"--base {base_dir} lacks {len(missing)} tensors of the delta (e.g. {missing[:3]}): "
                                f"is this the LLaMA base the delta was made for?")
    os.makedirs(out_dir, exist_ok=True)
    base = ShardReader(base_map)
    out_map: Dict[str, str] = {}
    total = len(delta_files)
    for i, delta_path in enumerate(tqdm(delta_files, desc="applying delta", unit="shard", disable=not progress,
                                        file=sys.stderr), start=1):
        merged = {}
        for name, delta in _read_shard(delta_path).items():
            b = base.get(name)
            if b.shape == delta.shape:
                merged[name] = (delta.float() + b.float()).to(delta.dtype).contiguous()
            elif b.ndim == delta.ndim == 2 and b.shape[1] == delta.shape[1] and b.shape[0] < delta.shape[0]:
                # Vicuna v0 adds a pad token: its embedding/lm_head have extra rows the base lacks.
                full = delta.float().clone()
                full[: b.shape[0]] += b.float()
                merged[name] = full.to(delta.dtype).contiguous()
            else:
                raise InvalidInputError(f"{name}: base shape {list(b.shape)} does not fit delta shape "
                                        f"{list(delta.shape)}: is --base the LLaMA the delta was made for?")
        shard_name = f"model-{i:05d}-of-{total:05d}.safetensors" if total > 1 else "model.safetensors"
        save_file(merged, os.path.join(out_dir, shard_name), metadata={"format": "pt"})
        out_map.update({name: shard_name for name in merged})
        del merged
    if total > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": out_map}, f, indent=1)
    copied = []
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(delta_dir, name)):
            shutil.copyfile(os.path.join(delta_dir, name), os.path.join(out_dir, name))
            copied.append(name)
    return {"tensors": len(out_map), "shards": total, "out": out_dir, "copied": copied}
