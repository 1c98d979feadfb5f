"""Pretraining of the tiny stand-ins, so that a stage-1 run has something to align.

MiniGPT-4's premise is a pretrained frozen LLM and a pretrained frozen vision tower joined by one
trained projection. Random stand-ins break that premise twice: a random LLaMA predicts nothing a
projection could steer, and the random frozen Q-Former erases the image (its output hardly varies
across images: BERT's 0.02 init at width 64 leaves the cross-attention a whisper next to the
LayerNormed queries). This module gives the tiny bundle the premise back, on scenes drawn from
seeds that no run trains or evaluates on:

1. the tiny LLaMA is trained as a language model on the synthetic caption language in the stage-1
   layout ([BOS][caption + end_sym]); half of its rows put the scene's keywords (colours, shape,
   size) in 32 slots before the caption, so it learns to copy from its context, as a real LLM
   does: a 2-layer LM needs ~600 steps for that (measured: 0.19 nats/token after keywords, 0.73
   without);
2. the Q-Former is trained between the frozen ViT (the random tiny ViT's output already carries
   the image) and the frozen LLaMA, as BLIP-2 trains it for a frozen LLM: query outputs -> a
   throwaway linear projection -> the LLaMA, with the caption loss plus a keyword loss (each slot's
   projected output classified against the LLaMA's word embeddings). The projection is
   discarded, so a stage-1 run starts from a fresh one, as MiniGPT-4 does from BLIP-2's Q-Former.

The trained weights are written back over the random files in the same layouts (HF folder, BLIP-2
`{"model": ...}` keys; the ViT file stays as written), so loaders see nothing new. Seeded; the same
seed gives the same files on the same machine and thread count.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Dict, Iterator, List

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Recorded in the bundle's marker: changing any of it rebuilds cached bundles.
PRETRAIN_RECIPE: Dict[str, object] = {
    "version": 1,
    "lm_steps": 600, "lm_batch": 32, "lm_lr": 3e-3,
    "vision_steps": 300, "vision_batch": 32, "vision_lr": 2e-3, "vision_pool": 1024,
    # Scenes of these seeds (plus the bundle seed) train the stand-ins; runs and probes use others.
    "lm_scene_seed": 1_000_001, "vision_scene_seed": 1_000_002,
}
END_SYM = "\n"  # the tiny configs' data.end_sym
MAX_TXT_LEN = 32  # the tiny configs' data.max_txt_len


def _scene_captions(seed: int, n: int) -> List[tuple]:
    from mgpt4_dist.data.text import blip_caption
    from mgpt4_dist.tiny.scenes import synthetic_scenes

    # Stage-1 captions are cleaned the way BLIP does (data.clean_captions): the LM learns that text.
    return [(scene, blip_caption(caption)) for _, _, scene, caption in synthetic_scenes(n, seed=seed, image_size=8)]


def keyword_slots(scene, num_slots: int) -> List[str]:
    """The words a scene's image prefix stands for, slot by slot: fg, shape, bg, size, repeated."""
    words = (scene.fg, scene.shape, scene.bg, scene.size)
    return [words[i % len(words)] for i in range(num_slots)]


def _lm_batch(tokenizer, rows: List[tuple], num_slots: int):
    """Token ids and labels: even rows [BOS][caption + end_sym], odd rows [BOS][keyword slots][caption +
    end_sym]; labels on the caption only, as stage 1 scores it."""
    import torch

    from mgpt4_dist.models.sequence import IGNORE_INDEX

    seqs = []
    for k, (scene, caption) in enumerate(rows):
        answer = tokenizer(caption + END_SYM, add_special_tokens=False)["input_ids"][:MAX_TXT_LEN]
        prefix = []
        if k % 2:
            prefix = [tokenizer(w, add_special_tokens=False)["input_ids"][-1] for w in keyword_slots(scene, num_slots)]
        seqs.append(([tokenizer.bos_token_id] + prefix, answer))
    length = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, (prefix, answer) in enumerate(seqs):
        n = len(prefix) + len(answer)
        ids[row, :n] = torch.tensor(prefix + answer)
        labels[row, len(prefix):n] = torch.tensor(answer)
        mask[row, :n] = 1
    return ids, labels, mask


def pretrain_language_model(llm_path: str, seed: int, num_slots: int, progress: bool = False) -> float:
    """Train the LLaMA folder's model in place; returns the last loss (nats/token).

    The corpus is the caption language, half of it after a prefix of keywords in fixed slots (the
    scene's colours, shape and size): the LM learns to copy from its context, as a real LLM does,
    which is what lets a projection of image features steer it."""
    import torch

    from mgpt4_dist.models.llm import load_llm, load_tokenizer

    steps, batch, lr = (PRETRAIN_RECIPE[k] for k in ("lm_steps", "lm_batch", "lm_lr"))
    tokenizer = load_tokenizer(llm_path)
    llm = load_llm(llm_path, dtype=torch.float32, attn_impl="sdpa").train()
    rows = _scene_captions(PRETRAIN_RECIPE["lm_scene_seed"] + seed, steps * batch)
    optim = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_value = float("nan")
    for step in range(steps):
        ids, labels, mask = _lm_batch(tokenizer, rows[step * batch:(step + 1) * batch], num_slots)
        loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        loss_value = loss.item()
        if progress and (step % 25 == 0 or step == steps - 1):
            log.info("pretraining the tiny LLaMA on captions: step %d/%d loss %.3f", step + 1, steps, loss_value)
    llm.eval().save_pretrained(llm_path)
    return loss_value


def _image_batches(seed: int, batch: int, steps: int, image_size: int) -> Iterator[tuple]:
    import torch

    from mgpt4_dist.data.text import blip_caption
    from mgpt4_dist.data.transforms import build_image_transform, decode_image
    from mgpt4_dist.tiny.scenes import encode_jpeg, synthetic_scenes

    transform = build_image_transform(image_size)
    samples = synthetic_scenes(steps * batch, seed=seed)
    for _ in range(steps):
        chunk = [next(samples) for _ in range(batch)]
        # Through JPEG and the training transform, as a run sees its shards.
        images = torch.stack([transform(decode_image(encode_jpeg(image))) for _, image, _, _ in chunk])
        yield images, [blip_caption(caption) for _, _, _, caption in chunk], [scene for _, _, scene, _ in chunk]


def across_image_spread(features_BQH: "torch.Tensor") -> float:
    """Share of the features' variance that is between images: per (token, channel) variance over
    the batch, averaged, over the variance of all values. ~0 when the output ignores the image."""
    total = features_BQH.float().var(unbiased=False)
    between = features_BQH.float().var(dim=0, unbiased=False).mean()
    return float(between / total)


def pretrain_vision_towers(paths: Dict[str, str], seed: int, progress: bool = False) -> Dict[str, float]:
    """BLIP-2-style pretraining of the Q-Former between the frozen ViT and the (already trained)
    frozen LLaMA, written back over the Q-Former file; returns losses and the Q-Former output's
    across-image spread before and after."""
    import torch

    from mgpt4_dist.config import load_config
    from mgpt4_dist.models.llm import load_llm, load_tokenizer
    from mgpt4_dist.models.minigpt4 import MiniGPT4, build_vision_towers
    from mgpt4_dist.models.sequence import SequenceBuilder
    from mgpt4_dist.tiny.assets import TINY_CONFIG

    steps, batch, lr, pool = (PRETRAIN_RECIPE[k] for k in ("vision_steps", "vision_batch", "vision_lr", "vision_pool"))
    cfg = load_config(TINY_CONFIG, [f"model.llm_path={paths['llm_path']}",
                                    f"model.vit_checkpoint={paths['vit_checkpoint']}",
                                    f"model.qformer_checkpoint={paths['qformer_checkpoint']}"]).model
    vit, qformer, _ = build_vision_towers(cfg, seed=seed)
    llm = load_llm(paths["llm_path"], dtype=torch.float32, attn_impl="sdpa").eval().requires_grad_(False)
    torch.manual_seed(seed)
    model = MiniGPT4(vit, qformer, llm)  # its llama_proj is the throwaway projection
    tokenizer = load_tokenizer(paths["llm_path"])
    build_text = SequenceBuilder(tokenizer, model.num_image_tokens, MAX_TXT_LEN, END_SYM)

    # As in BLIP-2 the image encoder stays frozen (the random tiny ViT's output already carries the
    # image: ~90 % of its variance is between images); its features are computed once.
    images, captions, scenes = next(_image_batches(PRETRAIN_RECIPE["vision_scene_seed"] + seed, pool, 1,
                                                   cfg.vit.img_size))
    with torch.no_grad():
        vit_tokens_BND = torch.cat([vit(images[k:k + 64]) for k in range(0, pool, 64)])
    del images
    keyword_ids_BQ = torch.tensor([[tokenizer(w, add_special_tokens=False)["input_ids"][-1]
                                    for w in keyword_slots(scene, model.num_image_tokens)] for scene in scenes])

    def spread() -> float:
        qformer.eval()
        with torch.no_grad():
            value = across_image_spread(qformer(vit_tokens_BND[:64]))
        qformer.train()
        return value

    # The random file uses BERT's init (std 0.02): at width 64 the Q-Former's cross-attention then
    # adds almost nothing to its LayerNormed queries, so its output ignores the image (spread ~0 %).
    # Training starts from PyTorch's default (fan-in scaled) init instead.
    for module in qformer.bert.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    report = {"qformer_spread_random_file": across_image_spread_of_file(vit, cfg, paths, vit_tokens_BND[:64])}
    report["qformer_spread_before"] = spread()
    trained = [qformer, model.llama_proj]
    for module in trained:
        module.train().requires_grad_(True)
    optim = torch.optim.AdamW([p for m in trained for p in m.parameters()], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=lr, total_steps=steps, pct_start=0.1)
    # BLIP-2 pairs its generative loss (caption through the frozen LLM) with discriminative ones on
    # the query outputs. Here each query token, through the throwaway projection, is classified
    # against the LLaMA's own word embeddings as the keyword of its slot (the context the LLaMA
    # learnt to copy from). With the generative loss alone the frozen LLaMA is most easily lowered
    # by one image-independent prefix and the Q-Former output collapses (measured: 6 % -> 1 %).
    word_embeds_VD = llm.get_input_embeddings().weight
    order = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = torch.randint(0, pool, (batch,), generator=order)
        features_BQH = qformer(vit_tokens_BND[rows])
        caption_loss = model.loss_terms(features_BQH, build_text([captions[r] for r in rows.tolist()])).loss
        logits_BQV = model.llama_proj(features_BQH) @ word_embeds_VD.T
        keyword_loss = torch.nn.functional.cross_entropy(logits_BQV.flatten(0, 1), keyword_ids_BQ[rows].flatten())
        optim.zero_grad(set_to_none=True)
        (caption_loss + keyword_loss).backward()
        optim.step()
        sched.step()
        report.update(caption_loss=caption_loss.item(), keyword_loss=keyword_loss.item())
        if progress and (step % 50 == 0 or step == steps - 1):
            log.info("pretraining the tiny Q-Former for the LLaMA: step %d/%d caption loss %.3f, keyword loss %.3f",
                     step + 1, steps, report["caption_loss"], report["keyword_loss"])
    report["qformer_spread_after"] = spread()
    _write_qformer_weights(qformer, paths["qformer_checkpoint"])
    return report


def across_image_spread_of_file(vit, cfg, paths: Dict[str, str], vit_tokens_BND) -> float:
    """The spread of the random Q-Former file as it was written (what a run on random assets gets)."""
    import torch

    from mgpt4_dist.models.loading import load_qformer_checkpoint
    from mgpt4_dist.models.qformer import QFormer

    qformer = QFormer(cfg.qformer, vision_width=cfg.vit.embed_dim, ln_vision_eps=cfg.ln_vision_eps)
    load_qformer_checkpoint(qformer, paths["qformer_checkpoint"])
    with torch.no_grad():
        return across_image_spread(qformer.eval()(vit_tokens_BND))


def _write_qformer_weights(qformer, path: str) -> None:
    """Trained tensors under the BLIP-2 file's own keys (the random file names every key)."""
    import torch

    from mgpt4_dist.models.loading import qformer_state_from_blip2

    blip2 = torch.load(path, weights_only=True)
    trained = qformer.state_dict()
    state = dict(blip2["model"])
    for key in state:
        ours, _ = qformer_state_from_blip2({key: state[key]})
        for our_key in ours:  # at most one: the key MiniGPT-4 reads; unused BLIP-2 keys stay as they were
            state[key] = trained[our_key].detach().clone().to(state[key].dtype)
    torch.save({**blip2, "model": state}, path)


def pretrain_tiny_world(paths: Dict[str, str], seed: int = 0, progress: bool = False) -> Dict[str, float]:
    """Both stages over a random bundle from `mgpt4_dist.tiny.assets`; returns what was measured."""
    import torch

    start = time.perf_counter()
    # Leave the caller's RNG streams as they were.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        from mgpt4_dist.tiny.assets import tiny_tower_sizes

        lm_loss = pretrain_language_model(paths["llm_path"], seed, tiny_tower_sizes()[1]["num_query_tokens"], progress)
        report = pretrain_vision_towers(paths, seed, progress)
    report.update(lm_loss=lm_loss, seconds=time.perf_counter() - start)
    log.info("pretrained the tiny stand-ins in %.0f s: LLaMA %.2f nats/token on captions; Q-Former output "
             "across-image spread %.1f%% -> %.1f%% (random file: %.1f%%); caption loss through it %.2f",
             report["seconds"], lm_loss, 100 * report["qformer_spread_before"], 100 * report["qformer_spread_after"],
             100 * report["qformer_spread_random_file"], report["caption_loss"])
    return report
