"""Engines: the one interface the training loop uses for forward/backward/step/save/load.

Only this package imports deepspeed or FSDP, and only `build_engine` branches on the backend.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from mgpt4_dist.config import ConfigError, JobConfig
from mgpt4_dist.parallel.engine import Engine, check_precision

__all__ = ["Engine", "build_engine"]

log = logging.getLogger(__name__)


def build_engine(cfg: JobConfig, model: nn.Module, world_size: int, grad_accum_steps: int) -> Engine:
    """Steps 3-4 of the build order (`mgpt4_dist.parallel.engine`); the only place that branches on
    the backend."""
    # Before the backend sees the model: DeepSpeed would refuse an unsupported dtype with a traceback
    # deep in initialize, FSDP would run it in slow reference kernels.
    check_precision(cfg.train.precision, next(model.parameters()).device)
    if cfg.parallel.activation_checkpointing:
        from mgpt4_dist.models.llm import apply_activation_checkpointing

        log.info("activation checkpointing: %d LLM decoder layers", apply_activation_checkpointing(model.llm))
    if cfg.train.compile:
        from mgpt4_dist.models.minigpt4 import apply_compile

        apply_compile(model)
    if cfg.train.compile_towers:
        from mgpt4_dist.models.minigpt4 import apply_compile_towers

        apply_compile_towers(model)
    if cfg.parallel.backend == "deepspeed":
        from mgpt4_dist.parallel.deepspeed_engine import DeepSpeedEngine

        engine: Engine = DeepSpeedEngine(cfg, model, world_size, grad_accum_steps)
    elif cfg.parallel.backend == "fsdp":
        from mgpt4_dist.parallel.fsdp_engine import FSDPEngine

        if cfg.parallel.offload != "none":
            raise ConfigError(f"parallel.offload={cfg.parallel.offload} is a DeepSpeed option: use "
                              f"parallel.backend=deepspeed, or parallel.offload=none with FSDP")
        engine = FSDPEngine(cfg, model, world_size, grad_accum_steps)
    else:
        raise ConfigError(f"parallel.backend={cfg.parallel.backend!r}: choose deepspeed or fsdp")
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
