"""DeepSpeed backend: ZeRO stage 0-3 around MiniGPT4, config derived from the run config."""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Optional

import torch
from torch import nn

from mgpt4_dist.config import JobConfig
from mgpt4_dist.optim import build_optimizer, build_scheduler
from mgpt4_dist.parallel.engine import Engine

log = logging.getLogger(__name__)

TEMPLATE_DIR = os.environ.get(
    "MGPT4_DS_CONFIGS", os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs"))


def load_template(stage: int) -> dict:
    path = os.path.join(TEMPLATE_DIR, f"zero{stage}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    log.warning("no DeepSpeed template at %s; starting from a bare ZeRO-%d config", path, stage)
    return {"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9}


def derive_ds_config(cfg: JobConfig, world_size: int, grad_accum_steps: int) -> dict:
    """The DeepSpeed JSON of a run: the stage template plus every value the run config states."""
    ds = copy.deepcopy(load_template(cfg.parallel.zero_stage))
    micro = cfg.train.micro_batch_size
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = grad_accum_steps
    ds["train_batch_size"] = micro * grad_accum_steps * world_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                  "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.parallel.zero_stage
    if cfg.parallel.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.parallel.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return ds


def build_offload_optimizer(model: nn.Module, cfg: JobConfig):
    """AdamW on the CPU for offloaded optimizer state: DeepSpeed's vectorised CPU Adam (it refuses
    torch optimizers with offload). Same groups, betas, eps and decoupled weight decay as
    `build_optimizer`. Its C++ op is JIT-compiled once (~1 min, cached in ~/.cache/torch_extensions)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from mgpt4_dist.optim import param_groups

    groups = [g for g in param_groups(model, cfg.optim.weight_decay) if g["params"]]
    return DeepSpeedCPUAdam(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            adamw_mode=True)


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: JobConfig, model: nn.Module, world_size: int, grad_accum_steps: int):
        import deepspeed

        self.cfg = cfg
        self.ds_config = derive_ds_config(cfg, world_size, grad_accum_steps)
        optimizer = build_offload_optimizer(model, cfg) if cfg.parallel.offload != "none" else \
            build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.module = self.engine.module

    def backend_config(self) -> Optional[tuple[str, dict]]:
        return "ds_config.json", self.ds_config

    def forward(self, images: torch.Tensor, text) -> torch.Tensor:
        return self.engine(images, text)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def skipped_steps(self) -> int:
        return int(getattr(self.engine, "skipped_steps", 0))

    def param_bytes(self) -> int:
        # ZeRO-3 leaves an empty placeholder in `param.data`; the rank's partition is `ds_tensor`.
        total = 0
        for p in self.module.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p
            total += local.numel() * local.element_size()
        return total

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, ckpt_root: str, tag: str) -> None:
        # Frozen weights are never copied into checkpoints: only llama_proj + optimizer state.
        self.engine.save_checkpoint(ckpt_root, tag=tag, save_latest=False, exclude_frozen_parameters=True)

    def load(self, ckpt_root: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(ckpt_root, tag=tag, load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint at {os.path.join(ckpt_root, tag)}")
