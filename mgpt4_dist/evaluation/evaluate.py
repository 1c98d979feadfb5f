"""Validation loss and greedy sample captions over the held-out set, and the training loop's hook.

Both passes take a *model call*: the MiniGPT4 root module as the engine holds it during training
(sharded under ZeRO-3 or FSDP2: calling the root is what gathers its weights), or a loaded model in
`mgpt4-eval`. Sequences come from the training code's `SequenceBuilder` (`prompt` for captions).

- Loss: each rank scores its share (sample i on rank i mod world); token-loss sums and token
  counts are summed over ranks, then divided, so the value does not depend on the world size.
- Captions: greedy, `max_new_tokens` LLM calls per batch; each rank makes the same number of
  model calls (a rank short of samples repeats a stand-in batch and drops its output), because
  sharded weights are gathered collectively.
- Eval leaves training as it was: no gradients, RNG states restored, the training data stream
  untouched (the set is read by the rank itself, not through the DataLoader).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from mgpt4_dist import dist
from mgpt4_dist.config import JobConfig, load_prompts
from mgpt4_dist.evaluation.caption_metrics import caption_scores, require_caption_metrics
from mgpt4_dist.evaluation.eval_set import EvalSample, EvalSet, read_eval_set, resolve_eval_shards
from mgpt4_dist.inference.conversation import cut_at_stops
from mgpt4_dist.metrics import drop_records_after
from mgpt4_dist.models.sequence import SequenceBuilder

log = logging.getLogger(__name__)

ModelCall = Callable[..., torch.Tensor]
SAMPLES_FILE = "samples.jsonl"


def metric_count(cfg: JobConfig, set_size: int) -> int:
    """Captions scored with BLEU-4/CIDEr-D: eval.metric_samples, -1 = the whole set."""
    return set_size if cfg.eval.metric_samples < 0 else min(cfg.eval.metric_samples, set_size)


def check_eval_config(cfg: JobConfig) -> None:
    """Start-time checks of eval.*: the shards exist, and the metrics package when metrics are asked for."""
    if cfg.eval.shards:
        resolve_eval_shards(cfg.eval.shards)
    if cfg.eval.shards and cfg.eval.metric_samples != 0:
        require_caption_metrics("eval.metric_samples (caption metrics during training; eval.metric_samples=0 "
                                "turns them off)")


def eval_instructions(cfg: JobConfig) -> List[str]:
    """Stage 2's instructions (data.prompts formatted with the template); empty for stage 1."""
    return load_prompts(cfg.data)


def loss_instruction(prompts: Sequence[str], index: int) -> Optional[str]:
    """A fixed instruction per held-out sample, by its index (the same for any world size)."""
    return prompts[index % len(prompts)] if prompts else None


def caption_instruction(prompts: Sequence[str]) -> Optional[str]:
    """The instruction captions are generated with: the run's first (stage 2), none (stage 1)."""
    return prompts[0] if prompts else None


def calls_needed(count: int, world: int, batch_size: int) -> int:
    """Model calls every rank makes for `count` samples split over `world` ranks."""
    return math.ceil(math.ceil(count / world) / batch_size) if count else 0


def _batches(share: List[EvalSample], batch_size: int, calls: int, stand_in: EvalSample):
    """(samples, real?) for each of `calls` calls; past the share, a stand-in batch."""
    for k in range(calls):
        chunk = share[k * batch_size:(k + 1) * batch_size]
        yield (chunk, True) if chunk else ([stand_in], False)


def loss_pass(model_call: ModelCall, eval_set: EvalSet, rank: int, world: int, builder: SequenceBuilder,
              prompts: Sequence[str], batch_size: int, device: torch.device,
              on_batch: Optional[Callable[[int], None]] = None) -> tuple[float, int]:
    """(sum of token losses, scored tokens) over the whole set, summed over ranks."""
    share = eval_set.share(rank, world)
    total, tokens = 0.0, 0
    for batch, real in _batches(share, batch_size, calls_needed(len(eval_set), world, batch_size),
                                eval_set.samples[0]):
        text = builder([s.caption for s in batch], [loss_instruction(prompts, s.index) for s in batch])
        with torch.no_grad():
            loss = model_call(eval_set.model_inputs(batch).to(device), text.to(device))
        if real:
            count = text.num_scored_tokens
            total += float(loss.detach().double()) * count  # the mean back into a sum, in fp64
            tokens += count
            if on_batch is not None:
                on_batch(len(batch))
    return dist.all_reduce_sum(total), int(dist.all_reduce_sum(tokens))


def caption_pass(model_call: ModelCall, eval_set: EvalSet, count: int, rank: int, world: int,
                 builder: SequenceBuilder, instruction: Optional[str], max_new_tokens: int, batch_size: int,
                 device: torch.device, end_sym: str,
                 on_batch: Optional[Callable[[int], None]] = None) -> Dict[int, str]:
    """Greedy captions of the first `count` samples, {index: caption}, on every rank."""
    tokenizer = builder.tokenizer
    stops = [end_sym, "</s>", "###"]
    mine: Dict[int, str] = {}
    for batch, real in _batches(eval_set.share(rank, world, count), batch_size, calls_needed(count, world, batch_size),
                                eval_set.samples[0]):
        prompt = builder.prompt(len(batch), instruction)
        with torch.no_grad():
            ids = model_call(eval_set.model_inputs(batch).to(device), prompt.to(device), generate_tokens=max_new_tokens)
        if real:
            for sample, row in zip(batch, ids.cpu()):
                mine[sample.index] = cut_at_stops(tokenizer.decode(row, skip_special_tokens=False), stops)
            if on_batch is not None:
                on_batch(len(batch))
    merged: Dict[int, str] = {}
    for part in dist.all_gather_object(mine):
        merged.update(part)
    return merged


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Leave the process's RNG streams as they were (greedy decoding draws nothing, but a model or
    library that did would otherwise shift the training run's randomness)."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state(state[3], device)


class Evaluator:
    """What the training loop runs every `eval.every_steps` steps and at the last step."""

    def __init__(self, cfg: JobConfig, builder: SequenceBuilder, rank: int, world: int, device: torch.device,
                 metrics, resume_step: int):
        check_eval_config(cfg)
        self.cfg, self.builder, self.rank, self.world, self.device = cfg, builder, rank, world, device
        self.metrics = metrics
        keep = [0] + (list(range(cfg.eval.num_samples)) if rank == 0 else [])
        self.eval_set = read_eval_set(cfg.eval.shards, cfg.eval.max_samples, image_size=cfg.model.vit.img_size,
                                      clean_captions=cfg.data.clean_captions,
                                      max_caption_words=cfg.data.max_caption_words, features=cfg.data.features,
                                      rank=rank, world=world, keep=keep)
        self.prompts = eval_instructions(cfg)
        self.num_metric = metric_count(cfg, len(self.eval_set))
        self.num_shown = min(cfg.eval.num_samples, len(self.eval_set))
        self.samples_path = os.path.join(cfg.run_dir, SAMPLES_FILE)
        if rank == 0:
            drop_records_after(self.samples_path, resume_step)
        log.info("eval: %d held-out samples from %d shard(s) every %d steps; %d captioned (%d shown, %d scored)",
                 len(self.eval_set), len(self.eval_set.shards), cfg.eval.every_steps,
                 max(self.num_shown, self.num_metric), self.num_shown, self.num_metric)

    def due(self, step: int, last_step: int) -> bool:
        return step % self.cfg.eval.every_steps == 0 or step == last_step

    def run(self, model_call: ModelCall, step: int) -> dict:
        start = time.perf_counter()
        batch_size = self.cfg.train.micro_batch_size
        with preserved_rng(self.device):
            total, tokens = loss_pass(model_call, self.eval_set, self.rank, self.world, self.builder, self.prompts,
                                      batch_size, self.device)
            captions = caption_pass(model_call, self.eval_set, max(self.num_shown, self.num_metric), self.rank,
                                    self.world, self.builder, caption_instruction(self.prompts),
                                    self.cfg.eval.max_new_tokens, batch_size, self.device, self.cfg.data.end_sym)
        values = {"val_loss": total / max(tokens, 1), "val_tokens": tokens}
        if self.num_metric:
            scored = self.eval_set.samples[:self.num_metric]
            scores = caption_scores([captions[s.index] for s in scored], [s.references for s in scored])
            values.update(val_bleu4=scores["bleu4"], val_cider=scores["cider"])
        values["eval_time_s"] = dist.all_reduce_max(time.perf_counter() - start)
        if self.rank == 0:
            self._write(step, values, captions)
        return values

    def _write(self, step: int, values: dict, captions: Dict[int, str]) -> None:
        shown = self.eval_set.samples[:self.num_shown]
        rows = [{"step": step, "key": s.key, "caption": captions[s.index], "reference": s.references[0]}
                for s in shown]
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        self.metrics.log_eval(step, values)
        for s, row in zip(shown, rows):
            tag = f"samples/{s.index:03d}_{s.key}"
            self.metrics.log_text(tag, f"generated: {row['caption']}\n\nreference: {row['reference']}", step)
            if not self.eval_set.features:
                self.metrics.log_image(tag + "/image", s.inputs, step)
