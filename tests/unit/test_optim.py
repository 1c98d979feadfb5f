"""Learning-rate schedule and parameter groups."""
import math

import pytest
import torch
from torch import nn

from mgpt4_dist.config import OptimConfig
from mgpt4_dist.optim import build_optimizer, build_scheduler, lr_at, param_groups


def test_warmup_then_cosine_endpoints():
    cfg = OptimConfig(lr=1e-4, min_lr=8e-5, warmup_start_lr=1e-6, warmup_steps=5000)
    assert lr_at(0, cfg, 20000) == pytest.approx(1e-6)
    assert lr_at(2500, cfg, 20000) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr_at(5000, cfg, 20000) == pytest.approx(1e-4)
    mid = 5000 + 7500
    assert lr_at(mid, cfg, 20000) == pytest.approx(8e-5 + 0.5 * 2e-5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20000, cfg, 20000) == pytest.approx(8e-5)


def test_scheduler_follows_lr_at():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_start_lr=0.0, warmup_steps=3)
    model = nn.Linear(4, 4)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, max_steps=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, cfg, 10) for s in range(10)])


def test_no_weight_decay_on_biases_and_frozen_excluded():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[1].weight.requires_grad = False
    groups = param_groups(model, 0.05)
    assert [len(g["params"]) for g in groups] == [1, 2]  # linear weight | linear bias + norm bias
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_a_zero3_partitioned_weight_keeps_its_weight_decay():
    proj = nn.Linear(4, 3)
    # What zero.Init leaves in the module: an empty 1-D placeholder that remembers its real shape.
    proj.weight.data = torch.empty(0)
    proj.weight.ds_shape = torch.Size([3, 4])
    decay, no_decay = param_groups(proj, 0.05)
    assert decay["params"] == [proj.weight] and decay["weight_decay"] == 0.05
    assert no_decay["params"] == [proj.bias] and no_decay["weight_decay"] == 0.0
