"""Plain nn.Modules of MiniGPT-4 and loaders for the original weight files.

Nothing here knows an engine, a launcher or the data pipeline.
"""
from mgpt4_dist.models.minigpt4 import MiniGPT4, build_minigpt4
from mgpt4_dist.models.sequence import SequenceBuilder, TextBatch

__all__ = ["MiniGPT4", "build_minigpt4", "SequenceBuilder", "TextBatch"]
