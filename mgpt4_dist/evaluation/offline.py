"""`mgpt4-eval`'s work: one model, one process, the evaluation passes training runs, over a shard set.

The model comes from a consolidated folder (`mgpt4-consolidate`), or from a run or step folder,
which is consolidated into a temporary folder first (the same engine-neutral trainable state).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional


from mgpt4_dist.config import JobConfig
from mgpt4_dist.evaluation.caption_metrics import caption_scores, require_caption_metrics
from mgpt4_dist.evaluation.eval_set import read_eval_set
from mgpt4_dist.evaluation.evaluate import (caption_instruction, caption_pass, eval_instructions, loss_pass)
from mgpt4_dist.export.inference_config import is_consolidated
from mgpt4_dist.models.sequence import SequenceBuilder


def read_model_config(path: str) -> JobConfig:
    """The run config of a consolidated, run or step folder, before anything heavy is loaded."""
    from mgpt4_dist.checkpoint.layout import read_run_config, resolve_step_dir
    from mgpt4_dist.inference.loader import read_consolidated_config

    if is_consolidated(path):
        return read_consolidated_config(path)[0]
    return read_run_config(resolve_step_dir(path))


def load_eval_model(path: str, device: str):
    """A LoadedModel (fp32 on CPU) from a consolidated, run or step folder."""
    from mgpt4_dist.export.consolidate import consolidate
    from mgpt4_dist.inference.loader import load_model

    if is_consolidated(path):
        return load_model(path, device=device)
    with tempfile.TemporaryDirectory(prefix="mgpt4-eval-") as tmp:
        consolidate(path, tmp)
        return load_model(tmp, device=device)


def evaluate_model(model_path: str, shards: str, max_samples: int = 5000, out: Optional[str] = None,
                   batch_size: int = 8, max_new_tokens: int = 30, device: str = "cpu", progress: bool = True) -> dict:
    """Loss, BLEU-4, CIDEr-D and greedy captions for the first `max_samples` samples of `shards`."""
    from tqdm import tqdm

    require_caption_metrics("mgpt4-eval")
    cfg = read_model_config(model_path)
    # The shards are checked before the model loads: a bad pattern fails in a second, not a minute.
    eval_set = read_eval_set([shards], max_samples, image_size=cfg.model.vit.img_size,
                             clean_captions=cfg.data.clean_captions, max_caption_words=cfg.data.max_caption_words,
                             features=False, what="--shards")
    bundle = load_eval_model(model_path, device)
    builder = SequenceBuilder(bundle.tokenizer, bundle.model.num_image_tokens, cfg.data.max_txt_len, cfg.data.end_sym,
                              cfg.model.max_context_len)
    prompts = eval_instructions(cfg)
    dtype = next(bundle.model.llama_proj.parameters()).dtype

    def model_call(images, text, **kwargs):
        return bundle.model(images.to(dtype), text, **kwargs)

    n = len(eval_set)
    with tqdm(total=2 * n, desc="mgpt4-eval", unit="sample", disable=not progress) as bar:
        total, tokens = loss_pass(model_call, eval_set, 0, 1, builder, prompts, batch_size, bundle.device,
                                  on_batch=bar.update)
        captions = caption_pass(model_call, eval_set, n, 0, 1, builder, caption_instruction(prompts), max_new_tokens,
                                batch_size, bundle.device, cfg.data.end_sym, on_batch=bar.update)
    scores = caption_scores([captions[s.index] for s in eval_set.samples], [s.references for s in eval_set.samples])
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            for s in eval_set.samples:
                f.write(json.dumps({"key": s.key, "caption": captions[s.index], "references": s.references}) + "\n")
    return {"loss": total / max(tokens, 1), "tokens": tokens, "bleu4": scores["bleu4"], "cider": scores["cider"],
            "samples": n, "skipped": eval_set.skipped, "shards": len(eval_set.shards), "out": out,
            "captions": [{"key": s.key, "caption": captions[s.index]} for s in eval_set.samples]}
