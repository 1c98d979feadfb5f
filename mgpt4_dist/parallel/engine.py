"""The Engine interface and its builder.

Build order (fixed, for every backend):
  1. build the model on every rank from the same seed, load original weight files, freeze;
  2. audit the trainable set (llama_proj only);
  3. wrap with the backend (DeepSpeed ZeRO-N), which shards and casts to the training precision;
  4. load a checkpoint if resuming (done by the trainer through `Engine.load`).
"""
from __future__ import annotations

import abc
from typing import Optional

import torch
from torch import nn

from mgpt4_dist.config import JobConfig

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine(abc.ABC):
    """What the training loop may do with a model; implemented once per backend."""

    module: nn.Module  # the unwrapped MiniGPT4

    @abc.abstractmethod
    def forward(self, images: torch.Tensor, text) -> torch.Tensor:
        """Loss of one micro-batch."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def step(self) -> None:
        """Called after every micro-batch; updates weights at accumulation boundaries."""

    @abc.abstractmethod
    def grad_norm(self) -> Optional[float]:
        """Global gradient norm of the last optimizer step (before clipping)."""

    @abc.abstractmethod
    def lr(self) -> float: ...

    @abc.abstractmethod
    def save(self, ckpt_root: str, tag: str) -> None:
        """Write the trainable state (weights, optimizer, scheduler, scaler) to ckpt_root/tag."""

    @abc.abstractmethod
    def load(self, ckpt_root: str, tag: str) -> None: ...

    def backend_config(self) -> Optional[tuple[str, dict]]:
        """(file name, content) of the backend's resolved config, written beside the run."""
        return None

    def trainable_state_dict(self) -> dict:
        return {k: v.detach().float().cpu().clone() for k, v in self.module.named_parameters() if v.requires_grad}


def build_engine(cfg: JobConfig, model: nn.Module, world_size: int, grad_accum_steps: int) -> Engine:
    if cfg.parallel.backend == "deepspeed":
        from mgpt4_dist.parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, world_size, grad_accum_steps)
    raise NotImplementedError(f"parallel.backend={cfg.parallel.backend} is not available yet; use deepspeed")
