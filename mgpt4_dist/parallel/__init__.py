"""Engines: the one interface the training loop uses for forward/backward/step/save/load.

Only this package imports deepspeed or FSDP, and only `build_engine` branches on the backend.
"""
from mgpt4_dist.parallel.engine import Engine, build_engine

__all__ = ["Engine", "build_engine"]
