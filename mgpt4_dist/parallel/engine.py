"""The Engine interface and its builder.

Build order (fixed, for every backend; the one place it is written down):
  1. build the model on every rank from the same seed, load original weight files, freeze
     (`build_minigpt4`, in the training precision, the frozen ViT in `model.vit_precision`;
     llama_proj is drawn in fp32 from the seed identically everywhere). At ZeRO-3 with
     `parallel.zero_init` (default) the build runs under `deepspeed.zero.Init`
     (`parallel/zero_init.py`): each parameter is partitioned as it is created and the weight
     files are written one module at a time under `GatheredParameters` (rank 0 reads the values),
     so no rank ever holds the whole model; otherwise every rank builds it whole;
  2. audit the trainable set (llama_proj only);
  3. apply activation checkpointing to the LLM decoder layers if `parallel.activation_checkpointing`
     (`apply_activation_checkpointing`; the frozen towers run under no_grad and keep no activations),
     then `torch.compile` each transformer block if `train.compile` (`apply_compile`; before
     wrapping, so FSDP2 shards the compiled blocks and DeepSpeed hooks see the same modules);
  4. wrap with the backend, which shards and casts:
       deepspeed: ZeRO-0/1/2 shard optimizer state (and grads); ZeRO-3 also partitions every
                  parameter, frozen ones included (at step 1 with zero.Init, else at
                  `deepspeed.initialize`); offload moves optimizer state (and parameters) to CPU;
                  a ViT in its own dtype is cast back after initialize casts the whole model;
       fsdp:      `fully_shard` per ViT block, Q-Former layer and LLM layer, llama_proj (fp32 master)
                  and the root; `MixedPrecisionPolicy` (compute in the precision, reduce in fp32),
                  so `model.vit_precision` other than the training precision is refused;
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
    def load(self, ckpt_root: str, tag: str) -> None:
        """Read a checkpoint this backend wrote with the same world size (and ZeRO stage)."""

    @abc.abstractmethod
    def load_full_state(self, weights: dict[str, torch.Tensor], moments: dict[str, dict[str, torch.Tensor]],
                        adam_step: Optional[int], scheduler_state: Optional[dict], counters: dict) -> None:
        """Collective. Put full (unsharded) fp32 state, as read from a checkpoint of any backend and
        layout, into this engine's shards, then read it back and raise unless it round-tripped exactly.

        weights: {name: fp32 tensor} of every trainable parameter; moments: {"exp_avg" | "exp_avg_sq":
        {name: tensor}}; adam_step: AdamW's step counter; scheduler_state: the lr schedule's
        state_dict (without its config); counters: global_steps, skipped_steps, loss_scale (the fp16
        dynamic loss scale or None) and optionally global_samples.
        """

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

        log.info("activation checkpointing: %d LLM decoder layers", apply_activation_checkpointing(model.llm))
    if cfg.train.compile:
        from mgpt4_dist.models.minigpt4 import apply_compile

        apply_compile(model)
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
