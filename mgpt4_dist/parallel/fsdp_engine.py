"""FSDP2 backend: `fully_shard` per transformer block, frozen weights sharded, llama_proj trains.

Sharding units (each one all-gathers its weights just before use and frees them after):
every ViT block, every Q-Former layer, every LLM decoder layer, `llama_proj` on its own (it keeps
fp32 master weights while the frozen towers may be bf16/fp16, and FSDP2 wants one dtype per unit),
and the root for what is left (patch embedding, query tokens, token embeddings, final norm,
lm_head). `MixedPrecisionPolicy` computes in the training precision and reduces gradients in
fp32. The optimizer, lr schedule, gradient clipping and accumulation semantics match the
DeepSpeed engine: the loss is divided by the accumulation steps, gradients are averaged over
ranks, clipped by their global norm, and fp16 uses a dynamic loss scale whose overflow steps are
skipped (no optimizer or schedule step) and counted.

Checkpoints: `torch.distributed.checkpoint` of llama_proj + AdamW state into `ckpt_root/tag/`
(frozen weights excluded), plus `engine_state.pt` (schedule, loss scale, counters) from rank 0.
`load` reads them back on the same world size; `get_full_state` gathers the whole state for the
engine-neutral file of every checkpoint, and `load_full_state` shards one read from a checkpoint of
any backend or world size.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.distributed as tdist
from torch import nn

from mgpt4_dist.config import JobConfig, precision_dtype
from mgpt4_dist.errors import MissingFileError
from mgpt4_dist.models.minigpt4 import transformer_blocks
from mgpt4_dist.optim import build_optimizer, build_scheduler
from mgpt4_dist.parallel.base import Engine, layout_name
from mgpt4_dist.checkpoint.state import MOMENTS, FullState

log = logging.getLogger(__name__)


class DynamicLossScaler:
    """fp16 loss scale: halve on overflow (the step is skipped), double after `window` good steps.

    Initial scale, window and floor are DeepSpeed's (2**16, 1000, 1). DeepSpeed's config also sets
    `hysteresis: 2` (it halves only at the second overflow in a row); this one halves at every
    overflow, so after an overflow the two engines' scales can differ by one halving. Both skip
    every overflow step and count it.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, window: int = 1000, min_scale: float = 1.0):
        self.scale, self.window, self.min_scale, self.good_steps = init_scale, window, min_scale, 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps % self.window == 0:
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def apply_fsdp(model: nn.Module, precision: str, device_type: str, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    compute = precision_dtype(precision)
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    # Master weights of what trains stay fp32; the frozen rest keeps the dtype the builder gave it.
    model.llama_proj.float()
    for unit in transformer_blocks(model):  # each block its own unit, innermost first
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model.llama_proj, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


class FSDPEngine(Engine):
    def __init__(self, cfg: JobConfig, model: nn.Module, world_size: int, grad_accum_steps: int):
        self.cfg = cfg
        self.accum = grad_accum_steps
        device_type = next(model.parameters()).device.type
        apply_fsdp(model, cfg.train.precision, device_type, world_size)
        self.module = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.scaler = DynamicLossScaler() if cfg.train.precision == "fp16" else None
        self.micro = 0
        self.global_steps = 0
        self._skipped = 0
        self._grad_norm: Optional[float] = None
        self._set_sync(self.accum == 1)

    def layout(self) -> str:
        return layout_name("fsdp", None)

    def _set_sync(self, sync: bool) -> None:
        # no_sync equivalent: gradients of non-final micro-batches stay local and accumulate.
        self.module.set_requires_gradient_sync(sync)

    def forward(self, images: torch.Tensor, text) -> torch.Tensor:
        return self.module(images, text)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss.float() / self.accum
        if self.scaler is not None:
            loss = loss * self.scaler.scale
        loss.backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum:
            self._set_sync(self.micro % self.accum == self.accum - 1)
            return
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if self.scaler is not None:
            for g in grads:
                g.mul_(1.0 / self.scaler.scale)
        total = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.grad_clip)
        total = total.full_tensor() if hasattr(total, "full_tensor") else total
        norm = float(total)
        overflow = not torch.isfinite(total).item()
        if self.scaler is not None:
            self.scaler.update(overflow)
        if overflow and self.scaler is not None:
            self._skipped += 1
            self._grad_norm = None
        else:
            self.optimizer.step()
            self.scheduler.step()
            self._grad_norm = norm
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        self._set_sync(self.accum == 1)

    def grad_norm(self) -> Optional[float]:
        return self._grad_norm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def skipped_steps(self) -> int:
        return self._skipped

    def param_bytes(self) -> int:
        total = 0
        for p in self.module.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
        return total

    # ------------------------------------------------------------------ checkpoints

    def _states(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(ignore_frozen_params=True)
        return get_state_dict(self.module, self.optimizer, options=opts), opts

    def _extra_state(self) -> dict:
        # The schedule's config object stays out so the file loads with weights_only=True; it is rebuilt
        # from the run config anyway.
        schedule = {k: v for k, v in self.scheduler.state_dict().items() if k != "cfg"}
        return {"scheduler": schedule, "scaler": self.scaler.state_dict() if self.scaler else None,
                "global_steps": self.global_steps, "skipped_steps": self._skipped, "micro": self.micro}

    def save(self, ckpt_root: str, tag: str) -> None:
        import torch.distributed.checkpoint as dcp

        path = os.path.join(ckpt_root, tag)
        (model_sd, optim_sd), _ = self._states()
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        if not tdist.is_initialized() or tdist.get_rank() == 0:
            torch.save(self._extra_state(), os.path.join(path, "engine_state.pt"))
        if tdist.is_initialized():
            tdist.barrier()

    def load(self, ckpt_root: str, tag: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = os.path.join(ckpt_root, tag)
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise MissingFileError(f"no FSDP (torch.distributed.checkpoint) checkpoint at {path}")
        (model_sd, optim_sd), _ = self._states()
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        # strict=False because the frozen weights are (by design) absent; the trainable ones must all be there,
        # which dcp.load has already enforced (it fails on a key of `state` missing from the checkpoint).
        opts = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=opts)
        extra = torch.load(os.path.join(path, "engine_state.pt"), weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler is not None and extra["scaler"] is not None:
            self.scaler.load_state_dict(extra["scaler"])
        self.global_steps, self._skipped, self.micro = extra["global_steps"], extra["skipped_steps"], extra["micro"]

    def get_full_state(self) -> FullState:
        """Every DTensor gathered whole (`full_tensor`, collective, in named_parameters order on every rank)."""
        weights, moments = {}, {kind: {} for kind in MOMENTS}
        adam_step = 0
        for name, p in self._trainable().items():
            weights[name] = _whole(p)
            state = self.optimizer.state.get(p, {})
            # AdamW makes its state at its first step (all fp16 steps skipped so far: none yet): zeros
            # and step 0 are what it starts from.
            for kind in MOMENTS:
                moments[kind][name] = _whole(state[kind]) if kind in state else torch.zeros_like(weights[name])
            if "step" in state:
                adam_step = int(state["step"].item() if torch.is_tensor(state["step"]) else state["step"])
        schedule = {k: v for k, v in self.scheduler.state_dict().items() if k != "cfg"}
        counters = {"global_steps": self.global_steps, "skipped_steps": self._skipped,
                    "loss_scale": float(self.scaler.scale) if self.scaler is not None else None}
        return FullState(weights, moments, adam_step, schedule, counters)

    def _trainable(self) -> dict:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def load_full_state(self, state: FullState) -> None:
        """Full tensors → this rank's DTensor shards (`distribute_tensor` with `src_data_rank=None`: every
        rank read the same full tensor from disk, so each cuts its own shard without communication)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        weights, moments, adam_step, scheduler_state, counters = state
        params = self._trainable()
        if set(params) != set(weights):
            raise RuntimeError(f"resharded resume: the checkpoint holds {sorted(weights)}, the model trains "
                               f"{sorted(params)}")

        def shard(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
            full = full.to(device=p.device, dtype=p.dtype)
            if isinstance(p, DTensor):
                return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            return full

        with torch.no_grad():
            for name, p in params.items():
                p.copy_(shard(p, weights[name]))
                # AdamW creates its state on the first step only when a parameter has none; a filled
                # state (step + both moments, the keys AdamW's non-amsgrad path reads) is used as is.
                state = self.optimizer.state[p]
                state.clear()
                state["step"] = torch.tensor(float(adam_step or 0), dtype=torch.float32)
                for kind in moments:
                    state[kind] = shard(p, moments[kind][name]).clone()
        if scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)
        self.global_steps = int(counters.get("global_steps", 0))
        self._skipped = int(counters.get("skipped_steps", 0))
        self.micro = self.global_steps * self.accum
        if self.scaler is not None and counters.get("loss_scale") is not None:
            self.scaler.scale, self.scaler.good_steps = float(counters["loss_scale"]), 0
        # Read back through the shards (collective, same order on every rank).
        for name, p in params.items():
            state = self.optimizer.state[p]
            for kind, got, want in [("weights", p, weights[name])] + [(k, state.get(k), moments[k][name])
                                                                        for k in moments]:
                if got is None or not torch.equal(_whole(got), want):
                    raise RuntimeError(f"resharded resume: {kind} of {name} did not round-trip into the engine")


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU fp32 copy of the whole tensor (collective for a DTensor)."""
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().float().cpu().clone()
