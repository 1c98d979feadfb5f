"""Data: webdataset shards, caption rules, image transforms and the training stream.

Knows the tokenizer-free text rules (caption cleaning) and images; not the model. The package
itself owns only `BadSampleError`, defined here so that `shards` and `transforms` can both raise it
without importing each other (`mgpt4_dist.data.shards.BadSampleError` is the same class).
"""


class BadSampleError(ValueError):
    """A sample, or the rest of a shard, that cannot be used; the training stream skips and counts it."""
