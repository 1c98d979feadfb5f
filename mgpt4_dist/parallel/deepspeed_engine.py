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
from mgpt4_dist.parallel.engine import PRECISION_DTYPES, Engine

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
    if cfg.parallel.zero_stage == 3:
        # Otherwise zero.Init swaps torch.nn.functional.linear, process-wide and for good, for
        # DeepSpeed's own autograd function, so every Linear in the process (inference helpers,
        # tests) would run through it. ZeRO-3's module hooks already re-gather the frozen weights
        # for the backward pass, which is all this run needs.
        zero.setdefault("memory_efficient_linear", False)
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
        # initialize casts every parameter of a whole model to bf16/fp16: keep the ViT's own
        # tensors to put back, rather than casting the rounded ones back (fp16 -> bf16 -> fp16 loses bits).
        vit_tensors = [(p, p.data) for p in model.visual_encoder.parameters() if not hasattr(p, "ds_id")]
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.module = self.engine.module
        self._restore_vit(cfg, vit_tensors)

    def _restore_vit(self, cfg: JobConfig, vit_tensors: list) -> None:
        """Put the frozen ViT's tensors (already in model.vit_precision) back after initialize cast
        them. It is outside the optimizer, so nothing else holds a copy. (ZeRO-3 without zero.Init
        and its own ViT dtype is refused by the config check: its parameters are partitioned by then.)"""
        from mgpt4_dist.models.minigpt4 import vit_dtype

        want = vit_dtype(cfg.model, PRECISION_DTYPES[cfg.train.precision])
        for p, data in vit_tensors:
            if p.dtype != want and data.dtype == want:
                p.data = data.to(p.device)

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

    def load_full_state(self, weights: dict, moments: dict, adam_step: Optional[int], scheduler_state: Optional[dict],
                        counters: dict) -> None:
        """Any ZeRO stage: through DeepSpeed's tensor-fragment API (`safe_set_full_fp32_param`,
        `safe_set_full_optimizer_state`), which maps a full tensor onto this rank's partition."""
        from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                     safe_set_full_fp32_param, safe_set_full_optimizer_state)

        if self.cfg.parallel.zero_stage == 0:
            raise NotImplementedError(
                "a resharded resume into ZeRO-0 is not supported (it has no fp32 partitions to write into): resume "
                "with parallel.zero_stage=1, 2 or 3, or on the checkpoint's own backend, ZeRO stage and world size")
        ds = self.engine
        base = ds.optimizer.optimizer  # the torch AdamW over this rank's fp32 partitions
        # Adam creates its state lazily: create it to fill it. ZeRO-3 swaps its flat fp32 partitions
        # into the param groups only during a step, so they are listed separately.
        flat_params = list(getattr(ds.optimizer, "fp32_partitioned_groups_flat", None) or
                           [p for group in base.param_groups for p in group["params"]])
        for p in flat_params:
            st = base.state[p]
            for kind in moments:
                st.setdefault(kind, torch.zeros_like(p, memory_format=torch.preserve_format))
            st["step"] = torch.tensor(float(adam_step or 0))
        if hasattr(ds.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link the state just made
            ds.optimizer._hp_optimizer_states_linked = False
            ds.optimizer._lazy_init_hp_params_optimizer_state()
        params = dict(self.module.named_parameters())
        for name, value in weights.items():
            safe_set_full_fp32_param(params[name], value)
            for kind in moments:
                safe_set_full_optimizer_state(params[name], moments[kind][name], kind)
        # The bit16 / module copy of the weights follows the fp32 master.
        for name, value in weights.items():
            p = params[name]
            if hasattr(p, "ds_id"):  # ZeRO-3: gather, set on every rank, re-partition (collective)
                from deepspeed.runtime.zero import GatheredParameters

                with GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(value.to(p.dtype))
            else:
                p.data.copy_(value.to(p.dtype))
        if scheduler_state is not None and ds.lr_scheduler is not None:
            ds.lr_scheduler.load_state_dict(scheduler_state)
        ds.global_steps = int(counters.get("global_steps", 0))
        # An FSDP checkpoint does not count samples; every step consumed one global batch.
        ds.global_samples = int(counters.get("global_samples") or ds.global_steps * ds.train_batch_size())
        ds.skipped_steps = int(counters.get("skipped_steps", 0))
        scaler = getattr(ds.optimizer, "loss_scaler", None)
        if counters.get("loss_scale") is not None and getattr(ds.optimizer, "dynamic_loss_scale", False) and scaler:
            scaler.cur_scale = float(counters["loss_scale"])
        # Read back: the new partitions must hold exactly the saved tensors.
        for name, value in weights.items():
            got = safe_get_full_fp32_param(params[name])
            if got is None or not torch.equal(got.cpu().float(), value):
                raise RuntimeError(f"resharded resume: {name} did not round-trip into the engine")
            for kind in moments:
                got = safe_get_full_optimizer_state(params[name], kind)
                if got is None or not torch.equal(got.cpu().float(), moments[kind][name]):
                    raise RuntimeError(f"resharded resume: {kind} of {name} did not round-trip into the engine")
