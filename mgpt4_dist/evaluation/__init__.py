"""Evaluation: the held-out set, validation loss, greedy sample captions and caption metrics.

- `eval_set`: the fixed held-out samples read from `eval.shards` (with their reference captions)
  and each rank's share of them.
- `caption_metrics`: BLEU-4 and CIDEr-D with the COCO caption scorers.
- `evaluate`: the loss and caption passes over a model call (an engine's sharded module during
  training, a loaded model in `mgpt4-eval`), and `Evaluator`, what the training loop calls.
"""
