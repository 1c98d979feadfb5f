"""A run's checkpoints and its run dir, one concern per module:

- `layout`: where checkpoints live (`RUN_DIR/checkpoints/step_NNNNNNNN/`, `latest`), tags, pruning,
  `meta.json`, and how a user names one (`checkpoint.resume`, a CLI's checkpoint path);
- `state`: what a checkpoint holds besides the engine's own files: the engine-neutral trainable
  state (`trainable_state.safetensors`), each rank's trainer state and RNG states, and
  `model.proj_checkpoint` read from a training folder;
- `manager`: saving and resuming (same layout, or resharded onto another engine or world size);
- `run_dir`: what a run may do with its run dir, and what changed since the checkpoint it resumes.

Above `models/` (it compares shapes and hands tensors to the model build) and below `parallel/`
and the train loop; it knows no engine's internals: engines are handed in as `Engine` objects.
"""
