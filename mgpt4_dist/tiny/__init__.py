"""The tiny world: a CPU-sized MiniGPT-4 setup on the real code path (quickstart, tests).

- `scenes`: the synthetic scene distribution (images, captions, attributes read back from text).
- `assets`: writers of random stand-ins in the original file layouts, and the cached bundle.
"""
