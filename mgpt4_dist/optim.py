"""Optimizer and learning-rate schedule of the MiniGPT-4 recipes.

AdamW (weight decay on matrices only) and a linear warmup from `warmup_start_lr` to `lr`
followed by a cosine decay to `min_lr` over the rest of `train.max_steps`. The original steps its
cosine once per "epoch"; we step it per optimizer step, which follows the same curve smoothly.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mgpt4_dist.config import OptimConfig
from mgpt4_dist.parallel.base import full_shape


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, with biases and norms (ndim < 2) excluded from weight decay."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            # The whole shape: under zero.Init the parameter itself is an empty 1-D placeholder
            # (judged by it, the projection weight silently lost its decay).
            (decay if len(full_shape(param)) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based: the step about to be taken)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / cfg.warmup_steps
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets every group's lr to `lr_at(step)` (absolute, so optim.lr=0 works too)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
        self.cfg, self.max_steps = cfg, max_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [lr_at(self.last_epoch, self.cfg, self.max_steps)] * len(self.optimizer.param_groups)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # The lr is a function of the step alone, so the optimizer's groups follow the restored step,
        # also when the optimizer state was not saved with them (a resume on another engine or layout).
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr()):
            group["lr"] = lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> WarmupCosineLR:
    return WarmupCosineLR(optimizer, cfg, max_steps)
