"""Data: webdataset shards, caption rules, image transforms and the training stream.

Knows the tokenizer-free text rules (caption cleaning) and images; not the model. Modules:
`shards` (shard URLs: expanding patterns, reading and writing tar shards), `remote` (opening
`pipe:`, HTTP(S) and object-store URLs as streams, with retries), `samples` (raw sample ->
image/features, caption, references), `sources` (caption files, image folders, cc_sbu_align),
`pipeline` (per-rank streams and batches, exact resume), `text`, `transforms`. The package itself
owns only `BadSampleError` and the `Sample` shape, defined here so the modules can share them
without importing each other.
"""


class BadSampleError(ValueError):
    """A sample, or the rest of a shard, that cannot be used; the training stream skips and counts it."""


# A sample as sources produce it and `shards.write_shards` takes it: (key, JPEG bytes, caption), or
# with a fourth item, a mapping of extra `KEY.json` fields (e.g. the reference captions).
Sample = tuple
