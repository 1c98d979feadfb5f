"""ZeRO-3 model build under `deepspeed.zero.Init`: no rank ever holds the whole model.

`build_minigpt4` is handed a `ZeroInitBuild` (the `mgpt4_dist.models.build` interface): modules are
constructed inside `zero.Init`, so each parameter is partitioned across ranks the moment its
module's `__init__` returns, and weight files are written one module's own parameters at a time
under `GatheredParameters(modifier_rank=0)`.

Who reads the files: every rank reads keys and shapes (safetensors headers; `.pth` files mapped
with mmap, so the ranks of a node share one copy in the page cache) and checks them, so a wrong file
fails on every rank alike, with no extra collective to agree on the error. Only rank 0 reads tensor
values and writes them; leaving the gather broadcasts them. Reading each rank's own slice instead
would need the partition layout (flat, padded, per parameter) mapped onto file offsets for a
one-time cost, and makes every rank of every node read the files from shared storage; one reader
per job is the simpler and lighter choice.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from mgpt4_dist import testing_hooks
from mgpt4_dist.config import JobConfig
from mgpt4_dist.models.build import LocalBuild, default_dtype
from mgpt4_dist.parallel.base import full_numel, full_shape


def uses_zero_init(cfg: JobConfig) -> bool:
    return cfg.parallel.backend == "deepspeed" and cfg.parallel.zero_stage == 3 and cfg.parallel.zero_init


def local_param_bytes(param: torch.Tensor) -> int:
    """Bytes this rank holds for `param`: its partition plus the whole tensor while gathered."""
    total = param.data.numel() * param.element_size()
    part = getattr(param, "ds_tensor", None)
    if part is not None:
        total += part.numel() * part.element_size()
    return total


class ZeroInitBuild(LocalBuild):
    sharded = True

    def __init__(self, ds_config: dict, track_memory: bool = False):
        self.ds_config = ds_config
        self.track_memory = track_memory
        self.peak_bytes = 0
        self._known: dict[int, nn.Parameter] = {}

    def construct(self, dtype: torch.dtype) -> contextlib.AbstractContextManager:
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride

        if not deepspeed.comm.is_initialized():
            # zero.Init reads the world size from deepspeed.comm; wrap the existing process group.
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False,
                                       verbose=False)
        stack = contextlib.ExitStack()
        # Parameters are created in `dtype` through the default dtype rather than zero.Init's dtype
        # override, which would also turn float tensors made from integer ranges (rotary inv_freq)
        # into bf16/fp16 and make them differ from the plain build.
        stack.enter_context(default_dtype(dtype))
        stack.enter_context(deepspeed.zero.Init(config_dict_or_path=self.ds_config, dtype=dtype,
                                                tensor_overrides=[DeepSpeedTensorOverride.device]))
        return stack

    def full_shape(self, tensor: torch.Tensor) -> tuple:
        return full_shape(tensor)

    def full_numel(self, tensor: torch.Tensor) -> int:
        return full_numel(tensor)

    @contextlib.contextmanager
    def gathered(self, params: Iterable[nn.Parameter]) -> Iterator[bool]:
        import deepspeed

        params = list(params)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            self._measure(params)
            yield torch.distributed.get_rank() == 0

    def built(self, module: nn.Module) -> None:
        if self.track_memory:
            self._known.update((id(p), p) for p in module.parameters())
            self._measure([])

    def place(self, model: nn.Module, device: torch.device) -> None:
        # zero.Init already put the parameters on the device; buffers made by plain tensor ops
        # (the rotary inv_freq) it does not move.
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)

    def _measure(self, extra: list) -> None:
        if not self.track_memory:
            return
        params = {**self._known, **{id(p): p for p in extra}}
        self.peak_bytes = max(self.peak_bytes, sum(local_param_bytes(p) for p in params.values()))


def model_build_for(cfg: JobConfig, world_size: int, grad_accum_steps: int) -> LocalBuild:
    """The build hook for `build_minigpt4`: zero.Init at ZeRO-3 when `parallel.zero_init`, else whole."""
    if not uses_zero_init(cfg):
        return LocalBuild()
    from mgpt4_dist.parallel.deepspeed_engine import derive_ds_config

    return ZeroInitBuild(derive_ds_config(cfg, world_size, grad_accum_steps),
                         track_memory=testing_hooks.engine_report_enabled())


def report_build_memory(model: nn.Module, build: LocalBuild) -> None:
    """Test hook (`mgpt4_dist.testing_hooks`, MGPT4_ENGINE_REPORT): the most parameter bytes this rank
    held during the build, and the whole model's parameter bytes."""
    if not testing_hooks.engine_report_enabled():
        return
    full = sum(full_numel(p) * p.element_size() for p in model.parameters())
    if isinstance(build, ZeroInitBuild):
        peak = build.peak_bytes
    else:  # a plain build ends with every parameter whole on this rank
        peak = sum(local_param_bytes(p) for p in model.parameters())
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    testing_hooks.write_engine_report("build_rank", rank, {"build_peak_param_bytes": peak, "full_param_bytes": full})
