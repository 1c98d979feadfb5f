"""The Engine interface, the build order every backend follows, and the precision check.

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
     (`apply_ac`; the frozen towers run under no_grad and keep no activations),
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
Steps 1-2 are `mgpt4_dist.parallel.build_model`, steps 3-4 `mgpt4_dist.parallel.build_engine`,
kept out of this module so that the backends' modules import the interface and nothing imports back.

Before step 4 `check_precision` refuses a `train.precision` the device cannot run (fp16 on a CPU
without oneDNN fp16, bf16 on a GPU older than Ampere), for both backends, before any training.

Every checkpoint also holds the engine-neutral trainable state (`Engine.get_full_state`, written
by `mgpt4_dist.checkpoint.manager`): consolidation, export, `model.proj_checkpoint` and a resume on another
backend, world size or ZeRO stage (`Engine.load_full_state`) read that, never an engine's own files.
"""
from __future__ import annotations

import abc
import os
from typing import Optional

import torch
from torch import nn

from mgpt4_dist.config import ConfigError
from mgpt4_dist.checkpoint.state import FullState



def full_shape(param: torch.Tensor) -> tuple:
    """A parameter's whole shape, also when ZeRO-3 has partitioned it: its own tensor is then an
    empty placeholder and DeepSpeed records the real shape as `ds_shape` (FSDP2's DTensors report
    their whole shape themselves)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param: torch.Tensor) -> int:
    """A parameter's whole element count (`ds_numel` when ZeRO-3 has partitioned it)."""
    return int(getattr(param, "ds_numel", param.numel()))


class PrecisionUnsupported(ConfigError):
    """train.precision names a dtype this device cannot train in."""


def _cpu_has_onednn_fp16() -> bool:
    # DeepSpeed's CPU accelerator asks the same question (CPU_Accelerator.is_fp16_supported) and
    # refuses fp16 in deepspeed.initialize when the answer is no.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:  # an older torch or a build without oneDNN
        return False


def precision_problem(precision: str, device: torch.device) -> Optional[str]:
    """Why `precision` cannot train on `device`, or None. The conditions are DeepSpeed's
    accelerator checks (`is_fp16_supported` / `is_bf16_supported` of its CPU and CUDA accelerators),
    applied to both backends so a config runs on both or on neither."""
    if precision == "fp32":
        return None
    other = "bf16 or fp32" if precision == "fp16" else "fp16 or fp32"
    if device.type == "cpu":
        if precision == "fp16" and not _cpu_has_onednn_fp16():
            return (f"train.precision=fp16 is not supported on this CPU (no oneDNN fp16: "
                    f"torch.ops.mkldnn._is_mkldnn_fp16_supported() is False): use train.precision={other}, "
                    f"or run on a GPU")
        return None  # bf16 runs on every x86-64 CPU (emulated where AVX512-BF16/AMX are missing)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return (f"train.precision=bf16 is not supported on this GPU (compute capability {major}.{minor}; "
                    f"bf16 needs 8.0+): use train.precision={other}")
        deprecated_ok = major == 6 and os.environ.get("DS_ALLOW_DEPRECATED_FP16", "0") == "1"
        if precision == "fp16" and major < 7 and not deprecated_ok:
            return (f"train.precision=fp16 is not supported on this GPU (compute capability {major}.{minor}; "
                    f"DeepSpeed needs 7.0+, or 6.x with DS_ALLOW_DEPRECATED_FP16=1): use train.precision=fp32")
    return None


def check_precision(precision: str, device: torch.device) -> None:
    problem = precision_problem(precision, device)
    if problem:
        raise PrecisionUnsupported(problem)


def layout_name(backend: str, zero_stage: Optional[int]) -> str:
    """The name of the file layout a backend's own checkpoints have, as meta.json's `layout` records
    it: `Engine.load` reads only its own layout. DeepSpeed's depends on the ZeRO stage, FSDP has one."""
    return f"deepspeed ZeRO-{zero_stage}" if backend == "deepspeed" else backend


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
        """Read a checkpoint this backend wrote with the same world size and `layout()`."""

    @abc.abstractmethod
    def layout(self) -> str:
        """The `layout_name` of the files `save` writes (e.g. "deepspeed ZeRO-2", "fsdp"); a checkpoint
        of another layout is resumed through the engine-neutral trainable state instead."""

    @abc.abstractmethod
    def get_full_state(self) -> FullState:
        """Collective (every rank calls it, in step). The whole trainable state gathered from this
        engine's shards, on the CPU of every rank; the mirror of `load_full_state`."""

    @abc.abstractmethod
    def load_full_state(self, state: FullState) -> None:
        """Collective. Put a whole trainable state, as read from a checkpoint of any backend and
        layout, into this engine's shards, then read it back and raise unless it round-tripped exactly."""

    def backend_config(self) -> Optional[tuple[str, dict]]:
        """(file name, content) of the backend's resolved config, written beside the run."""
        return None

    def skipped_steps(self) -> int:
        """Optimizer steps skipped by the fp16 dynamic loss scaler (overflow); 0 otherwise."""
        return 0

    def trainable_shapes(self) -> dict:
        """{name: whole shape} of every trainable parameter, however the backend shards it."""
        return {n: full_shape(p) for n, p in self.module.named_parameters() if p.requires_grad}

    def param_bytes(self) -> int:
        """Bytes of parameter storage this rank holds (its shards only, when sharded)."""
        return sum(p.numel() * p.element_size() for p in self.module.parameters())
