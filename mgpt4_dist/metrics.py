"""Training metrics: `RUN_DIR/metrics.jsonl`, TensorBoard under `RUN_DIR/tb/`, a progress line.

Only rank 0 writes. A resumed run appends to the same jsonl file, so the file holds the whole
curve of a run across preemptions and crash restarts. An attempt that crashed logged steps past its
last checkpoint, which the next attempt trains again: those records are dropped when the resumed run
opens the file, and TensorBoard is told to hide them (`purge_step`), so every step appears once.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

# TensorBoard tag for each metric; data/skipped is the running count of bad samples,
# data/skipped_shards that of shards skipped because their source failed (missing, retries spent).
TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "samples_per_s": "perf/samples_per_s", "tokens_per_s": "perf/tokens_per_s",
           "step_time_s": "perf/step_time_s", "data_wait_s": "perf/data_wait_s",
           "max_mem_bytes": "perf/max_mem_bytes", "skipped": "data/skipped", "skipped_shards": "data/skipped_shards",
           "nonfinite_steps": "train/nonfinite_steps", "mfu": "perf/mfu", "fp16_skipped_steps": "train/fp16_skipped_steps", "flops_per_s": "perf/flops_per_s",
           "val_loss": "val/loss", "val_tokens": "val/tokens", "val_bleu4": "val/bleu4", "val_cider": "val/cider",
           "eval_time_s": "perf/eval_time_s"}

# Evaluation records (mgpt4_dist.evaluation), their own lines in metrics.jsonl (a contract).
EVAL_JSONL_FIELDS = ("step", "val_loss", "val_tokens", "eval_time_s", "val_bleu4", "val_cider")


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def drop_records_after(path: str, step: int) -> None:
    """Rewrite `path` without the records of steps after `step` (atomically: a crash leaves either file)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, run_dir: str, max_steps: int, enabled: bool, tensorboard: bool = True,
                 progress: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.max_steps = max_steps
        self.progress = progress
        self.start_time = time.time()
        self.start_step: Optional[int] = None
        self.writer = None
        self.jsonl = None
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(run_dir, "tb")
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        drop_records_after(self.jsonl_path, resume_step)
        self.jsonl = open(self.jsonl_path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides what earlier event files logged from this step on.
            self.writer = SummaryWriter(self.tb_dir, purge_step=resume_step + 1 if os.path.isdir(self.tb_dir) else None)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step, self.start_time = step - 1, time.time() - values.get("step_time_s", 0.0)
        record = {"step": step, **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(TB_TAGS.get(key, f"train/{key}"), value, step)
        if self.progress:
            done = step - self.start_step
            elapsed = time.time() - self.start_time
            eta = elapsed / max(done, 1) * (self.max_steps - step)
            print(f"step {step}/{self.max_steps} | loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
                  f"{values['samples_per_s']:.1f} samples/s | skipped {values['skipped']} | ETA {_fmt_duration(eta)}",
                  file=sys.stdout, flush=True)

    def log_eval(self, step: int, values: dict) -> None:
        """An evaluation record: its own line in metrics.jsonl, `val/*` in TensorBoard, one printed line."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(TB_TAGS.get(key, f"val/{key}"), value, step)
        if self.progress:
            scores = "".join(f" | {name} {values[key]:.4f}" for key, name in (("val_bleu4", "BLEU-4"),
                                                                             ("val_cider", "CIDEr-D")) if key in values)
            print(f"eval step {step} | val_loss {values['val_loss']:.4f} over {values['val_tokens']} tokens{scores} | "
                  f"{values['eval_time_s']:.1f}s", file=sys.stdout, flush=True)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def log_image(self, tag: str, image_CHW_uint8, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_CHW_uint8, step, dataformats="CHW")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
