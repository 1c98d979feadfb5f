"""The Engine interface and its builder.

Build order (fixed, for every backend; the one place it is written down):
  1. build the model on every rank from the same seed, load original weight files, freeze
     (`build_minigpt4`, in the training precision; llama_proj is seeded identically everywhere);
  2. audit the trainable set (llama_proj only);
  3. apply activation checkpointing to the LLM decoder layers if `parallel.activation_checkpointing`
     (`apply_activation_checkpointing`; the frozen towers run under no_grad and keep no activations);
  4. wrap with the backend, which shards and casts:
       deepspeed: ZeRO-0/1/2 shard optimizer state (and grads); ZeRO-3 also partitions every
                  parameter, frozen ones included, at `deepspeed.initialize`; offload moves
                  optimizer state (and parameters) to CPU;
       fsdp:      `fully_shard` per ViT block, Q-Former layer and LLM layer, llama_proj (fp32 master)
                  and the root; `MixedPrecisionPolicy` (compute in the precision, reduce in fp32);
  5. load a checkpoint if resuming (done by the trainer through `Engine.load`).
"""
from __future__ import annotations

import abc
import logging
import os
from typing import Optional

import torch
from torch import nn

from mgpt4_dist.config import JobConfig

log = logging.getLogger(__name__)

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

    def skipped_steps(self) -> int:
        """Optimizer steps skipped by the fp16 dynamic loss scaler (overflow); 0 otherwise."""
        return 0

    def param_bytes(self) -> int:
        """Bytes of parameter storage this rank holds (its shards only, when sharded)."""
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def trainable_state_dict(self) -> dict:
        return {k: v.detach().float().cpu().clone() for k, v in self.module.named_parameters() if v.requires_grad}


def build_engine(cfg: JobConfig, model: nn.Module, world_size: int, grad_accum_steps: int) -> Engine:
    """Steps 3-4 of the build order above; the only place that branches on the backend."""
    if cfg.parallel.activation_checkpointing:
        from mgpt4_dist.models.llm import apply_activation_checkpointing

        apply_activation_checkpointing(model.llm)
    if cfg.parallel.backend == "deepspeed":
        from mgpt4_dist.parallel.deepspeed_engine import DeepSpeedEngine

        engine: Engine = DeepSpeedEngine(cfg, model, world_size, grad_accum_steps)
    elif cfg.parallel.backend == "fsdp":
        from mgpt4_dist.parallel.fsdp_engine import FSDPEngine

        if cfg.parallel.offload != "none":
            raise ValueError("parallel.offload is a DeepSpeed option; use parallel.backend=deepspeed or offload=none")
        engine = FSDPEngine(cfg, model, world_size, grad_accum_steps)
    else:
        raise ValueError(f"parallel.backend={cfg.parallel.backend!r}: choose deepspeed or fsdp")
    log.info("engine %s: %.1f MB of parameters on this rank", type(engine).__name__, engine.param_bytes() / 2**20)
    _maybe_report(engine)
    return engine


def _maybe_report(engine: Engine) -> None:
    """Test hook: MGPT4_ENGINE_REPORT=DIR makes each rank write its measured parameter bytes."""
    out = os.environ.get("MGPT4_ENGINE_REPORT")
    if not out:
        return
    import json

    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"param_bytes": engine.param_bytes()}, f)
