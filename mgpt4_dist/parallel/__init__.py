"""Everything that knows a backend: building the model for it, wrapping it, and the Engine interface.

Only this package imports deepspeed or FSDP, reads ZeRO's partition attributes (`ds_shape`,
`ds_tensor`), and branches on `parallel.backend`; the training loop sees an `Engine`
(`mgpt4_dist.parallel.base`) and a model built by `build_model`.

The build order is written down once, in `mgpt4_dist.parallel.base`; here it is run:
`build_model` (step 1-2: the model build strategy, plain or under `deepspeed.zero.Init`, and the
trainable-set audit), then `build_engine` (step 3-4, torchtitan's order: `apply_ac`, then
`apply_compile`, then the backend wraps).
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from mgpt4_dist import testing_hooks
from mgpt4_dist.config import ConfigError, JobConfig, precision_dtype
from mgpt4_dist.parallel.base import Engine, check_precision

__all__ = ["Engine", "apply_ac", "apply_compile", "apply_compile_towers", "build_engine", "build_model"]

log = logging.getLogger(__name__)


def build_model(cfg: JobConfig, world_size: int, grad_accum_steps: int, device: torch.device,
                proj_source=None) -> nn.Module:
    """Steps 1-2 of the build order: the MiniGPT4 of `cfg.model` on `device`, weight files loaded,
    everything but llama_proj frozen and audited. At ZeRO-3 with `parallel.zero_init` (the default)
    the parameters are partitioned as they are created (and already on their device); otherwise
    every rank builds the whole model. `proj_source`: `model.proj_checkpoint`'s tensors, read by
    the caller (`mgpt4_dist.checkpoint.state.proj_state_for`)."""
    from mgpt4_dist.models.minigpt4 import audit_trainable, build_minigpt4
    from mgpt4_dist.parallel.zero_init import model_build_for, report_build_memory

    if cfg.parallel.backend == "deepspeed":  # a parallel.deepspeed_config at odds with the config fails before the build
        from mgpt4_dist.parallel.deepspeed_engine import derive_ds_config

        derive_ds_config(cfg, world_size, grad_accum_steps)
    build = model_build_for(cfg, world_size, grad_accum_steps)
    model = build_minigpt4(cfg.model, seed=cfg.train.seed, dtype=precision_dtype(cfg.train.precision),
                           device_type=device.type, build=build, proj_source=proj_source)
    report_build_memory(model, build)
    counts = audit_trainable(model, build)
    log.info("parameters: %d trainable (llama_proj), %d frozen%s", counts["trainable_params"], counts["frozen_params"],
             " (built partitioned under deepspeed.zero.Init)" if build.sharded else "")
    build.place(model, device)
    return model


def apply_ac(llm: nn.Module, compile_layers: bool = False) -> int:
    """Activation checkpointing: recompute each LLM decoder layer in backward instead of keeping its
    activations; returns the number of layers wrapped.

    Wraps each layer's forward (non-reentrant `torch.utils.checkpoint`) rather than the module, so
    parameter names stay as in the weight files. HF's own `gradient_checkpointing_enable` is not
    used: it only acts in train mode, and the frozen LLM stays in eval mode. With `compile_layers`
    (train.compile) the wrapped forward is the compiled one: `checkpoint` is never traced by
    torch.compile, so a compiled module around it would run its layer eager.
    """
    from torch.utils.checkpoint import checkpoint

    layers = llm.model.layers
    for layer in layers:
        inner = torch.compile(layer.forward) if compile_layers else layer.forward
        layer.forward = functools.partial(checkpoint, inner, use_reentrant=False)
    log.info("activation checkpointing: %d LLM decoder layers%s", len(layers),
             " (compiled inside)" if compile_layers else "")
    return len(layers)


def apply_compile(model: nn.Module, llm_layers: bool = True) -> int:
    """torch.compile every transformer block in place (`nn.Module.compile`); the LLM's decoder layers
    only with `llm_layers` (with activation checkpointing `apply_ac` compiles them inside it).

    Per block rather than the whole model: identical blocks share one compiled graph, parameter
    names and module identities stay as they are (sharding and checkpoints see the same model),
    and the data-dependent parts (image-slot scatter, scored-position gather) stay eager.
    """
    from mgpt4_dist.models.minigpt4 import transformer_blocks

    skip = set() if llm_layers else {id(layer) for layer in model.llm.model.layers}
    blocks = [block for block in transformer_blocks(model) if id(block) not in skip]
    for block in blocks:
        block.compile()
    log.info("torch.compile: %d transformer blocks", len(blocks))
    return len(blocks)


def apply_compile_towers(model: nn.Module) -> None:
    """torch.compile the frozen towers (ViT, ln_vision, Q-Former) as one inference graph.

    One graph from image to features: no autograd, so the compiler fuses across block boundaries
    (layer norms, residual adds, GELU into their neighbours), which `apply_compile`'s per-block
    training graphs cannot. The module tree and parameter names stay as they are; only
    `MiniGPT4.vision_features` calls the compiled function. Compilation happens at the first batch.
    """
    from mgpt4_dist.models.minigpt4 import compute_vision_features

    # Stored outside nn.Module's registries: the compiled function is not a submodule to save or shard.
    model.__dict__["_compiled_towers"] = torch.compile(compute_vision_features, dynamic=False)
    log.info("torch.compile: frozen vision towers as one inference graph")


def build_engine(cfg: JobConfig, model: nn.Module, world_size: int, grad_accum_steps: int) -> Engine:
    """Steps 3-4 of the build order; the only place that branches on the backend."""
    # Before the backend sees the model: DeepSpeed would refuse an unsupported dtype with a traceback
    # deep in initialize, FSDP would run it in slow reference kernels.
    check_precision(cfg.train.precision, next(model.parameters()).device)
    if cfg.parallel.backend not in ("deepspeed", "fsdp"):
        raise ConfigError(f"parallel.backend={cfg.parallel.backend!r}: choose deepspeed or fsdp")
    if cfg.parallel.backend == "fsdp" and cfg.parallel.offload != "none":
        raise ConfigError(f"parallel.offload={cfg.parallel.offload} is a DeepSpeed option: use "
                          f"parallel.backend=deepspeed, or parallel.offload=none with FSDP")
    if cfg.parallel.activation_checkpointing:
        apply_ac(model.llm, compile_layers=cfg.train.compile)
    if cfg.train.compile:
        apply_compile(model, llm_layers=not cfg.parallel.activation_checkpointing)
    if cfg.train.compile_towers:
        apply_compile_towers(model)
    if cfg.parallel.backend == "deepspeed":
        from mgpt4_dist.parallel.deepspeed_engine import DeepSpeedEngine

        engine: Engine = DeepSpeedEngine(cfg, model, world_size, grad_accum_steps)
    else:
        from mgpt4_dist.parallel.fsdp_engine import FSDPEngine

        engine = FSDPEngine(cfg, model, world_size, grad_accum_steps)
    log.info("engine %s: %.1f MB of parameters on this rank", type(engine).__name__, engine.param_bytes() / 2**20)
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    testing_hooks.write_engine_report("rank", rank, {"param_bytes": engine.param_bytes()})
    return engine
