"""The tiny world: a CPU-sized MiniGPT-4 setup on the real code path (quickstart, tests).

- `scenes`: the synthetic scene distribution (images, captions, attributes read back from text).
- `assets`: writers of random stand-ins in the original file layouts, and the cached bundle.
- `pretrain`: turns the random stand-ins into pretrained-like ones (a language model that knows
  the caption language, vision towers whose output carries the image), so stage 1 can learn.
- `probe`: what a stage-1 run learnt, on held-out scenes (generated captions, attribute accuracy,
  own-vs-other caption loss).
"""
