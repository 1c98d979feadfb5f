"""How `build_minigpt4` creates parameters and writes loaded weights into them.

`LocalBuild` (the default) builds every tensor whole on this rank. A sharded build (DeepSpeed
ZeRO-3 `zero.Init`, supplied by `mgpt4_dist.parallel.zero_init`) partitions each parameter as it
is created, so a rank only ever holds its slice plus the one module being filled; `models/`
talks to it only through this interface (whole shapes included: `full_shape`) and never imports
an engine or knows how one partitions.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules constructed inside create their floating parameters in `dtype`."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class LocalBuild:
    """Every parameter whole on every rank; writes are local."""

    sharded = False

    def construct(self, dtype: torch.dtype) -> contextlib.AbstractContextManager:
        """Context for constructing modules whose parameters should live in `dtype`."""
        return default_dtype(dtype)

    def full_shape(self, tensor: torch.Tensor) -> tuple:
        """A parameter's whole shape (a sharded build's own tensor may be an empty placeholder)."""
        return tuple(tensor.shape)

    def full_numel(self, tensor: torch.Tensor) -> int:
        return int(tensor.numel())

    @contextlib.contextmanager
    def gathered(self, params: Iterable[nn.Parameter]) -> Iterator[bool]:
        """Make `params` whole for writing; yields whether this rank's writes are kept."""
        yield True

    def built(self, module: nn.Module) -> None:
        """Told about each finished part of the model (test hooks measure memory here)."""

    def place(self, model: nn.Module, device: torch.device) -> None:
        """Move the finished model to the device it trains on."""
        model.to(device)


def copy_state_into(module: nn.Module, state: dict, build: LocalBuild) -> None:
    """Write `state` (keys of `module.state_dict()`, already checked) into `module`, one
    submodule's own parameters at a time so a sharded build gathers one small module at once."""
    for prefix, sub in module.named_modules():
        dot = prefix + "." if prefix else ""
        params = [(dot + n, p) for n, p in sub.named_parameters(recurse=False) if dot + n in state]
        buffers = [(dot + n, b) for n, b in sub.named_buffers(recurse=False) if b is not None and dot + n in state]
        with torch.no_grad():
            # Buffers are never partitioned and every rank read the same file: each writes its own.
            for key, buf in buffers:
                buf.copy_(state[key].to(buf.dtype))
            if not params:
                continue
            with build.gathered([p for _, p in params]) as write:
                if write:
                    for key, param in params:
                        param.data.copy_(state[key].to(param.dtype))
