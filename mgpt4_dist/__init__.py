"""mgpt4_dist: scale-out training of MiniGPT-4 style vision-language models (README.md, "Layout").

The package root holds the leaves anyone may import (config, errors, dist, metrics) and the train
loop (train.py); each subpackage owns one concern: models/, parallel/, checkpoint/, export/,
data/, evaluation/, inference/, tiny/, cli/.
"""
