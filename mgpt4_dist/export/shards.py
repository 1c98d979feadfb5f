"""Sharded safetensors writing for exported folders (`mgpt4-consolidate --full`, `mgpt4-export --format hf`).

The transformers convention: `model-0000I-of-0000N.safetensors` beside `model.safetensors.index.json`
({"metadata": {"total_size": ...}, "weight_map": {tensor name: file}}), or one `model.safetensors`.
Tensors are written as shards fill, so a whole model is never held at once.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch


class ShardWriter:
    """Safetensors shards of at most `shard_bytes` (one tensor may exceed it), written as they fill.

    `metadata`: each shard file's header metadata; `index_metadata`: added to the index's metadata.
    `single_file`: one shard is written as plain `model.safetensors` with no index; otherwise the
    shard names and the index are written whatever the count (a consolidated folder always has them).
    """

    def __init__(self, out_dir: str, shard_bytes: int, metadata: Optional[Dict[str, str]] = None,
                 index_metadata: Optional[Dict[str, str]] = None, single_file: bool = True):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.metadata = {"format": "pt"} if metadata is None else metadata
        self.index_metadata = index_metadata or {}
        self.single_file = single_file
        self.current: Dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: List[Tuple[str, List[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_together({name: tensor})

    def add_together(self, tensors: Dict[str, torch.Tensor]) -> None:
        """`tensors` in one shard: the current one, or a new one when they do not fit it."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.current and self.current_bytes + nbytes > self.shard_bytes:
            self.flush()
        for name, tensor in tensors.items():
            self.current[name] = tensor.contiguous()
        self.current_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        tmp = f".shard-{len(self.files):05d}.safetensors"
        save_file(self.current, os.path.join(self.out_dir, tmp), metadata=self.metadata)
        self.files.append((tmp, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> List[str]:
        """Rename the shards into place and write the index; returns the file names written."""
        self.flush()
        if self.single_file and len(self.files) == 1:
            os.replace(os.path.join(self.out_dir, self.files[0][0]), os.path.join(self.out_dir, "model.safetensors"))
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            names.append(final)
            weight_map.update({k: final for k in keys})
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes, **self.index_metadata}, "weight_map": weight_map},
                      f, indent=1)
        return names + ["model.safetensors.index.json"]
