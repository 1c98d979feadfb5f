"""Plain nn.Modules of MiniGPT-4 (vit, qformer, llm, minigpt4, sequence), how their parameters are
created (build.py), the loaders of the original weight files (weights.py) and the tensor mapping to
and from transformers' Blip2ForConditionalGeneration (hf_blip2.py).

Nothing here knows an engine, a launcher, the data pipeline or a training checkpoint: partitioned
builds come in through `models.build.LocalBuild`'s interface, and `model.proj_checkpoint` read from
a training run comes in as tensors (`mgpt4_dist.checkpoint.state.proj_state_for`).
"""
from mgpt4_dist.models.minigpt4 import MiniGPT4, build_minigpt4
from mgpt4_dist.models.sequence import SequenceBuilder, TextBatch

__all__ = ["MiniGPT4", "build_minigpt4", "SequenceBuilder", "TextBatch"]
